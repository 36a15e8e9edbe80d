// One submitted job on screen: queue position and ETA, live step previews, cancel, then the pictures.
import { api, imageUrl } from "./api.js";
import { follow } from "./sse.js";

const TERMINAL = new Set(["completed", "failed", "cancelled"]);

/** The terminal event a finished job's view stands for, by its status. */
const TERMINAL_STATUS = {
  succeeded: (view) => ({ type: "completed", images: view.images, mask: view.mask }),
  failed: (view) => ({ type: "failed", code: view.error?.code ?? "", message: view.error?.message ?? "" }),
  cancelled: () => ({ type: "cancelled" }),
};

function seconds(ms) {
  return ms == null ? "" : ` — about ${(ms / 1000).toFixed(1)} s left`;
}

function element(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

/** Shows a finished picture with its seed, a download link and an "Edit this" button. */
export async function pictureFigure(image, model) {
  const url = await imageUrl(image.url);
  const img = element("img", { src: url, alt: `Result ${image.index + 1}, seed ${image.seed}`, className: "result" });
  img.dataset.seed = image.seed;
  const download = element("a", { href: url, download: `denoised-${image.seed}.${image.format}`, textContent: "Download" });
  const edit = element("button", { type: "button", className: "secondary", textContent: "Edit this" });
  edit.addEventListener("click", () => {
    document.dispatchEvent(new CustomEvent("edit-picture", { detail: { url, model } }));
    document.getElementById("edit").scrollIntoView();
  });
  return element("figure", {}, [img, element("figcaption", {}, [`seed ${image.seed} `, download, " ", edit])]);
}

/** Shows the mask a DiffEdit job computed (white: repainted). */
async function maskFigure(mask) {
  const url = await imageUrl(mask.url);
  const img = element("img", { src: url, alt: "The mask found from the prompts (white: repainted)", className: "mask" });
  return element("figure", {}, [img, element("figcaption", { textContent: "computed mask" })]);
}

/** Marks `container` as waiting for a new job's answer (its old pictures are no longer current). */
export function submitting(container) {
  container.dataset.state = "submitting";
}

/** Follows `job` (a 202 answer) inside `container` until it ends; resolves with the terminal event. */
export async function watchJob(container, job) {
  container.hidden = false;
  const status = element("p", { className: "status", role: "status", textContent: "submitted" });
  status.setAttribute("aria-live", "polite");
  const bar = element("progress", { max: 1, value: 0 });
  bar.setAttribute("aria-label", "Progress");
  const preview = element("img", { className: "preview", alt: "Step preview" });
  preview.hidden = true;
  preview.dataset.previews = "0";
  const cancel = element("button", { type: "button", className: "secondary cancel", textContent: "Cancel" });
  const pictures = element("div", { className: "pictures" });
  const seed = element("p", { className: "seed" });
  container.replaceChildren(status, bar, cancel, preview, pictures, seed);
  container.dataset.jobId = job.id;
  container.dataset.state = "queued";

  const controller = new AbortController();
  let terminal = null;
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" });
      if (!terminal) status.textContent = "cancelling…";
    } catch (error) {
      if (terminal) return; // it ended meanwhile (409): the terminal state is already shown
      status.textContent = `cancel failed: ${error.message}`;
      cancel.disabled = false;
    }
  });

  // A safety net beside the stream: if the job has ended but no terminal event arrived, end from its view.
  const poll = setInterval(async () => {
    const view = await api(`/v1/jobs/${job.id}`).catch(() => null);
    if (view && !terminal && TERMINAL_STATUS[view.status]) {
      terminal = TERMINAL_STATUS[view.status](view);
      controller.abort();
    }
  }, 2000);
  await follow(
    job.id,
    (event) => {
      if (!TERMINAL.has(event.type)) container.dataset.state = event.type;
      if (event.type === "queued") {
        status.textContent = `queued — position ${event.position + 1}${seconds(event.eta_ms)}`;
      } else if (event.type === "started") {
        status.textContent = "running";
      } else if (event.type === "progress") {
        bar.max = event.total;
        bar.value = event.step;
        status.textContent = `step ${event.step} of ${event.total}${seconds(event.eta_ms)}`;
        if (event.preview) {
          preview.src = event.preview;
          preview.hidden = false;
          preview.dataset.previews = String(Number(preview.dataset.previews) + 1);
        }
      } else {
        terminal ??= event;
      }
    },
    controller.signal,
  ).finally(() => clearInterval(poll));
  cancel.hidden = true;
  if (!terminal) {
    status.textContent = "lost the event stream";
    return null;
  }
  if (terminal.type === "completed") {
    bar.value = bar.max;
    status.textContent = "done";
    const figures = await Promise.all(terminal.images.map((image) => pictureFigure(image, job.model)));
    if (terminal.mask) figures.push(await maskFigure(terminal.mask));
    pictures.replaceChildren(...figures);
    preview.hidden = true;
    seed.textContent = `Seed used: ${terminal.images.map((image) => image.seed).join(", ")}`;
  } else if (terminal.type === "failed") {
    status.textContent = `failed: ${terminal.message} (${terminal.code})`;
  } else {
    status.textContent = "cancelled";
  }
  container.dataset.state = terminal.type;
  document.dispatchEvent(new CustomEvent("job-ended", { detail: terminal }));
  return terminal;
}
