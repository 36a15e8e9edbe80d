// Boot: the API key, then the models and schedulers that the forms are built from.
import { api, getKey, setKey } from "./api.js";
import { setupEdit } from "./edit.js";
import { wireSeedToggles } from "./fields.js";
import { loadGallery, setupGallery } from "./gallery.js";
import { setupGenerate } from "./generate.js";

const $ = (id) => document.getElementById(id);
let started = false;

async function start() {
  const status = $("key-status");
  try {
    const [models, schedulers] = await Promise.all([api("/v1/models"), api("/v1/schedulers")]);
    status.textContent = getKey() ? "key saved" : "";
    if (!started) {
      started = true;
      setupGenerate(models.data, schedulers.data);
      setupEdit(models.data);
      setupGallery();
    }
    document.body.dataset.ready = "true";
    await loadGallery();
  } catch (error) {
    status.textContent = error.status === 401 ? "this server needs an API key" : `cannot reach the API: ${error.message}`;
    $("api-key").focus();
  }
}

$("api-key").value = getKey();
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setKey($("api-key").value.trim());
  start();
});
wireSeedToggles(document);
start();
