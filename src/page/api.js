// The API client: the key kept in localStorage, sent as a bearer header (never in a URL).
const KEY = "denoised.apiKey";

export function getKey() {
  return localStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

export function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** JSON.parse keeping `seed` exact: seeds are u64, past what a JS number holds, so they stay digit strings. */
export function parseJson(text) {
  return JSON.parse(text, (key, value, context) => (key === "seed" && context?.source ? context.source : value));
}

/** JSON.stringify writing BigInt values (seeds) as plain JSON numbers. */
export function toJson(body) {
  const marked = JSON.stringify(body, (key, value) => (typeof value === "bigint" ? `__u64__${value}` : value));
  return marked.replace(/"__u64__(\d+)"/g, "$1");
}

/** An error answered by the API: `{error: {code, message, field}}` plus the HTTP status. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail.message || `HTTP ${status}`);
    this.status = status;
    this.code = detail.code || "";
    this.field = detail.field || "";
  }
}

/** Calls `path`; `json` is sent as a JSON body, `form` as multipart. Answers the parsed JSON (or null). */
export async function api(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, headers: authHeaders(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = toJson(json);
  } else if (form) {
    init.body = form;
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    let detail = {};
    try {
      detail = parseJson(await response.text()).error || {};
    } catch {
      detail = { message: `HTTP ${response.status}` };
    }
    throw new ApiError(response.status, detail);
  }
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? parseJson(await response.text()) : null;
}

/** Downloads an image (which needs the bearer header, so no plain `<img src>`) as an object URL. */
export async function imageUrl(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw new ApiError(response.status, { message: `image: HTTP ${response.status}` });
  return URL.createObjectURL(await response.blob());
}
