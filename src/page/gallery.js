// The gallery: the caller's jobs (paged with next_cursor), their parameters, re-run, download, delete.
import { api, imageUrl } from "./api.js";
import { rerun } from "./generate.js";

const $ = (id) => document.getElementById(id);
let cursor = null;

function button(label, onClick, className = "secondary") {
  const node = Object.assign(document.createElement("button"), { type: "button", textContent: label, className });
  node.addEventListener("click", onClick);
  return node;
}

async function card(job) {
  const item = document.createElement("li");
  item.dataset.jobId = job.id;
  item.dataset.status = job.status;
  const params = job.params || {};
  const pictures = await Promise.all(
    job.images.map(async (image) => {
      const url = await imageUrl(image.url).catch(() => "");
      const img = Object.assign(document.createElement("img"), { src: url, alt: `${params.prompt || job.kind}, seed ${image.seed}` });
      const download = Object.assign(document.createElement("a"), {
        href: url,
        download: `denoised-${job.id}-${image.index}.${image.format}`,
        textContent: `Download ${image.index + 1}`,
      });
      const edit = button("Edit this", () => {
        document.dispatchEvent(new CustomEvent("edit-picture", { detail: { url, model: job.model } }));
        $("edit").scrollIntoView();
      });
      return [img, download, edit];
    }),
  );
  const title = Object.assign(document.createElement("strong"), { textContent: params.prompt || "(no prompt)" });
  const meta = Object.assign(document.createElement("p"), {
    className: "meta",
    textContent: `${job.kind} · ${job.status} · ${job.model} · seed ${params.seed ?? "?"} · ${new Date(job.created_at).toLocaleString()}`,
  });
  const details = document.createElement("details");
  details.append(Object.assign(document.createElement("summary"), { textContent: "Parameters" }));
  details.append(Object.assign(document.createElement("pre"), { textContent: JSON.stringify(params, null, 2) }));
  const actions = Object.assign(document.createElement("div"), { className: "actions" });
  if (job.kind === "generate") actions.append(button("Re-run (same seed)", () => rerun(job)));
  actions.append(
    button("Delete", async () => {
      try {
        await api(`/v1/jobs/${job.id}`, { method: "DELETE" });
        item.remove();
      } catch (error) {
        $("gallery-status").textContent = `delete failed: ${error.message}`;
      }
    }),
  );
  for (const [img, download, edit] of pictures) item.append(img, download, edit);
  item.append(title, meta, details, actions);
  return item;
}

/** Loads the first page (`more` false) or the next one. */
export async function loadGallery(more = false) {
  const status = $("gallery-status");
  if (!more) cursor = null;
  const query = new URLSearchParams({ limit: "12" });
  if (cursor) query.set("cursor", cursor);
  status.textContent = "loading…";
  try {
    const page = await api(`/v1/jobs?${query}`);
    const cards = await Promise.all(page.data.map(card));
    if (more) $("gallery-list").append(...cards);
    else $("gallery-list").replaceChildren(...cards);
    cursor = page.next_cursor || null;
    $("gallery-more").hidden = !cursor;
    status.textContent = $("gallery-list").children.length ? "" : "no jobs yet";
  } catch (error) {
    status.textContent = `could not list jobs: ${error.message}`;
  }
}

/** Wires the buttons; the gallery refreshes whenever a job ends. */
export function setupGallery() {
  $("gallery-refresh").addEventListener("click", () => loadGallery());
  $("gallery-more").addEventListener("click", () => loadGallery(true));
  document.addEventListener("job-ended", () => loadGallery());
}
