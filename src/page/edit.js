// The Edit form: a picture (uploaded or reused), img2img, inpainting with a brush or a DiffEdit mask found from
// two prompts, outpainting, instruct.
import { api } from "./api.js";
import { clearErrors, fillSelect, showError, values } from "./fields.js";
import { submitting, watchJob } from "./job.js";
import { MaskPainter } from "./mask.js";

const $ = (id) => document.getElementById(id);
let painter;
let source = null; // the picture's object URL

async function loadPicture(url) {
  const picture = new Image();
  picture.src = url;
  await picture.decode();
  source = url;
  painter.setPicture(picture);
  $("e-canvas-area").hidden = false;
  $("e-canvas-area").dataset.width = picture.naturalWidth;
}

function modelsFor(models, mode) {
  return models.filter((m) => m.capabilities.includes(mode));
}

/** Whether inpainting finds its mask from the prompts (DiffEdit) instead of the brush. */
function autoMask() {
  return $("e-mode").value === "inpaint" && $("e-auto").checked;
}

function syncMode(models) {
  const mode = $("e-mode").value;
  for (const field of document.querySelectorAll("#edit-form [data-modes]")) {
    const inMode = field.dataset.modes.split(" ").includes(mode);
    // The source prompt goes with a DiffEdit mask, the brush with a painted one.
    const shown = inMode && !("auto" in field.dataset && !autoMask()) && !("painted" in field.dataset && autoMask());
    field.hidden = !shown;
    for (const control of field.querySelectorAll("input, select, textarea")) if (control.name) control.disabled = !shown;
  }
  fillSelect($("e-model"), modelsFor(models, mode).map((m) => [m.id, `${m.id} (${m.family})`]));
  painter.enabled = mode === "inpaint" && !autoMask();
  painter.draw();
  const model = models.find((m) => m.id === $("e-model").value);
  if (model) {
    $("e-steps").placeholder = model.default_steps;
    $("e-guidance").placeholder = model.default_guidance_scale;
  }
}

async function submit(event) {
  event.preventDefault();
  const form = $("edit-form");
  clearErrors(form);
  if (!source) {
    showError(form, { field: "image", message: "choose a picture first (upload one, or “Edit this” under a result)" });
    return;
  }
  submitting($("edit-job"));
  const body = new FormData();
  for (const [name, value] of Object.entries(values(form))) body.append(name, String(value));
  body.append("image", await (await fetch(source)).blob(), "image.png");
  if (autoMask()) body.append("mask", "auto");
  else if ($("e-mode").value === "inpaint") body.append("mask", await painter.toPng(), "mask.png");
  try {
    const job = await api("/v1/edits", { method: "POST", form: body });
    await watchJob($("edit-job"), job);
  } catch (error) {
    showError(form, error);
  }
}

/** Wires the form to `models`; a picture arrives by upload or by an `edit-picture` event. */
export function setupEdit(models) {
  painter = new MaskPainter($("e-canvas"));
  const instruct = $("e-mode").querySelector('[value="instruct"]');
  for (const option of $("e-mode").options) {
    option.disabled = modelsFor(models, option.value).length === 0;
    if (option.disabled) option.textContent += " (no model can)";
  }
  if (instruct.disabled && $("e-mode").value === "instruct") $("e-mode").value = "img2img";
  $("e-mode").addEventListener("change", () => syncMode(models));
  $("e-auto").addEventListener("change", () => syncMode(models));
  $("e-model").addEventListener("change", () => syncMode(models));
  syncMode(models);
  $("e-image").addEventListener("change", () => {
    const file = $("e-image").files[0];
    if (file) loadPicture(URL.createObjectURL(file)).catch((error) => showError($("edit-form"), { field: "image", message: String(error) }));
  });
  document.addEventListener("edit-picture", (event) => {
    const { url, model } = event.detail;
    if ([...$("e-model").options].some((option) => option.value === model)) {
      $("e-model").value = model;
      syncMode(models);
    }
    loadPicture(url);
  });
  $("e-strength").addEventListener("input", () => {
    $("e-strength-value").value = $("e-strength").value;
  });
  $("e-brush").addEventListener("input", () => {
    painter.brush = Number($("e-brush").value);
    $("e-brush-value").value = $("e-brush").value;
  });
  $("e-erase").addEventListener("change", () => {
    painter.erase = $("e-erase").checked;
  });
  $("e-clear").addEventListener("click", () => painter.clear());
  $("e-fill").addEventListener("click", () => painter.fill());
  $("e-invert").addEventListener("click", () => painter.invert());
  $("edit-form").addEventListener("submit", submit);
}

/** The painter, for tests and the console. */
export function maskPainter() {
  return painter;
}
