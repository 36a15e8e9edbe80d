// The Generate form: model and scheduler pickers, every field with the model's defaults, submit and follow.
import { api } from "./api.js";
import { clearErrors, fillSelect, showError, values } from "./fields.js";
import { submitting, watchJob } from "./job.js";

const form = () => document.getElementById("generate-form");

/** Scheduler choices of `model`: its own default first, then the ones it lists, described. */
export function schedulerItems(model, schedulers) {
  const described = new Map(schedulers.map((s) => [s.id, s.description]));
  const items = [["", `default (${model.default_scheduler})`]];
  for (const id of model.schedulers) items.push([id, described.has(id) ? `${id} — ${described.get(id)}` : id]);
  return items;
}

/** Shows `model`'s defaults in the generation fields of `root`. */
export function applyDefaults(root, model, schedulers) {
  fillSelect(root.querySelector("[name=scheduler]"), schedulerItems(model, schedulers), "");
  const set = (name, value) => {
    const input = root.querySelector(`[name=${name}]`);
    if (input) input.value = value;
  };
  set("width", model.width);
  set("height", model.height);
  set("steps", model.default_steps);
  set("guidance_scale", model.default_guidance_scale);
  for (const name of ["width", "height"]) {
    const input = root.querySelector(`[name=${name}]`);
    if (input) input.step = model.size_multiple;
  }
}

/** Submits the form's request and follows the job. */
async function submit(event) {
  event.preventDefault();
  const target = form();
  clearErrors(target);
  const body = values(target);
  const button = target.querySelector("button[type=submit]");
  button.disabled = true;
  submitting(document.getElementById("generate-job"));
  try {
    const job = await api("/v1/images", { method: "POST", json: body });
    button.disabled = false;
    await watchJob(document.getElementById("generate-job"), job);
  } catch (error) {
    showError(target, error);
  } finally {
    button.disabled = false;
  }
}

/** Wires the form to `models` and `schedulers` (from `GET /v1/models` and `GET /v1/schedulers`). */
export function setupGenerate(models, schedulers) {
  const target = form();
  const picker = target.querySelector("[name=model]");
  fillSelect(picker, models.map((m) => [m.id, `${m.id} (${m.family}, ${m.width}×${m.height})`]));
  const sync = () => {
    const model = models.find((m) => m.id === picker.value);
    if (model) applyDefaults(target, model, schedulers);
  };
  picker.addEventListener("change", sync);
  sync();
  target.addEventListener("submit", submit);
}

/** Fills the form with a job's `params` and its seed, then submits it (the gallery's "re-run"). */
export function rerun(job) {
  const target = form();
  const params = job.params || {};
  const picker = target.querySelector("[name=model]");
  picker.value = job.model;
  picker.dispatchEvent(new Event("change"));
  for (const control of target.elements) {
    if (control.name && params[control.name] != null && control.name !== "scheduler") control.value = params[control.name];
  }
  const scheduler = target.querySelector("[name=scheduler]");
  if (params.scheduler && [...scheduler.options].some((o) => o.value === params.scheduler)) scheduler.value = params.scheduler;
  const random = document.getElementById("g-random");
  random.checked = false;
  random.dispatchEvent(new Event("change"));
  target.querySelector("[name=seed]").value = params.seed ?? "";
  document.getElementById("generate").scrollIntoView();
  target.requestSubmit();
}
