// Forms: typed values out, API field errors in next to the field they name.

/** The form's named, enabled, non-empty controls as an object (numbers typed by `data-type`). */
export function values(form) {
  const out = {};
  for (const control of form.elements) {
    if (!control.name || control.disabled || control.type === "file") continue;
    const raw = control.value.trim();
    if (raw === "") continue;
    const type = control.dataset.type;
    if (type === "u64") out[control.name] = /^\d+$/.test(raw) ? BigInt(raw) : raw;
    else if (type === "int") out[control.name] = Number.isInteger(Number(raw)) ? Number(raw) : raw;
    else if (type === "float") out[control.name] = Number.isFinite(Number(raw)) ? Number(raw) : raw;
    else out[control.name] = raw;
  }
  return out;
}

/** Removes every error message of the form. */
export function clearErrors(form) {
  for (const slot of form.querySelectorAll("[data-error-for]")) slot.textContent = "";
  for (const control of form.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
}

/** Shows `error` next to the field it names (`error.field`), else as the form's own error. */
export function showError(form, error) {
  const field = error.field || "";
  const slot = (field && form.querySelector(`[data-error-for="${CSS.escape(field)}"]`)) || form.querySelector('[data-error-for=""]');
  slot.textContent = error.message || String(error);
  slot.id ||= `${form.id}-error-${field || "form"}`;
  const control = field && form.elements.namedItem(field);
  if (control && control.setAttribute) {
    control.setAttribute("aria-invalid", "true");
    control.setAttribute("aria-describedby", slot.id);
    control.focus();
  }
}

/** Wires every "random" seed checkbox to enable or disable its seed input. */
export function wireSeedToggles(root) {
  for (const box of root.querySelectorAll("[data-seed-toggle]")) {
    const input = root.querySelector(`#${box.dataset.seedToggle}`);
    const sync = () => {
      input.disabled = box.checked;
    };
    box.addEventListener("change", sync);
    sync();
  }
}

/** Fills `select` with `items` ([value, label]) keeping the current choice when it is still there. */
export function fillSelect(select, items, preferred) {
  const keep = preferred ?? select.value;
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value)));
  if (items.some(([value]) => value === keep)) select.value = keep;
}
