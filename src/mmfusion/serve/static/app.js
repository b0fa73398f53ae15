// mmfusion's web page: search by words or by an example image, more like this, ask, caption and label.
// Plain ES module, no build step and nothing fetched from elsewhere. URLs are relative, so the page also
// works behind a reverse proxy under a path prefix.

import { loadCards } from "./cards.js";
import { markVideoCard, showVideo as playVideo } from "./video.js";

const K = 24; // results per search
const KEY_STORE = "mmfusion-api-key";

const $ = (id) => document.getElementById(id);
const el = {
  service: $("service"), keyForm: $("key-form"), key: $("key"),
  form: $("search-form"), q: $("q"), pick: $("pick"), file: $("file"), drop: $("drop"),
  example: $("example"), exampleImg: $("example-img"), exampleText: $("example-text"),
  exampleClear: $("example-clear"), message: $("message"),
  heading: $("results-heading"), summary: $("summary"), grid: $("grid"),
  panel: $("panel"), panelTitle: $("panel-title"), panelClose: $("panel-close"), panelImg: $("panel-img"),
  panelMeta: $("panel-meta"), panelMore: $("panel-more"), panelOpen: $("panel-open"),
  askForm: $("ask-form"), question: $("question"), ask: $("ask"), caption: $("caption"), askHint: $("ask-hint"),
  answer: $("answer"), answerLabel: $("answer-label"), answerText: $("answer-text"), askError: $("ask-error"),
  labelsForm: $("labels-form"), labels: $("labels"), labelList: $("label-list"), labelsError: $("labels-error"),
};

const state = {
  health: null,
  key: localStorage.getItem(KEY_STORE) || "",
  example: null, // the File searched by, while its chip is shown
  exampleUrl: null,
  search: null, // AbortController of the search in flight
  tool: null, // AbortController of the panel's request in flight (answer, caption)
  blobs: [], // object URLs of thumbnails fetched with a key, freed with the grid
  current: null, // the result shown in the panel
  opener: null, // the element focus returns to when the panel closes
};

// ---- talking to the service ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function errorOf(res) {
  // The service answers {"error": {"message": ...}}; FastAPI's own 404/422 say {"detail": ...}.
  let text = "";
  try {
    text = await res.text();
    const body = JSON.parse(text);
    const msg = body?.error?.message ?? body?.detail;
    if (typeof msg === "string") return new ApiError(msg, res.status);
    if (Array.isArray(msg)) return new ApiError(msg.map((d) => d.msg || JSON.stringify(d)).join("; "), res.status);
  } catch {
    // not JSON: fall through to the status line
  }
  const hint = res.status === 401 ? " (enter an API key above)" : "";
  return new ApiError(`${res.status} ${res.statusText || "error"}${text && !hint ? `: ${text.slice(0, 200)}` : hint}`,
    res.status);
}

function headers(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

async function api(path, { json, form, signal, method } = {}) {
  const init = { method: method || (json || form ? "POST" : "GET"), headers: headers(), signal };
  if (json) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form;
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("cannot reach the service: is it still running?", 0);
  }
  if (!res.ok) {
    const err = await errorOf(res);
    if (err.status === 401) showKeyForm();
    throw err;
  }
  return res;
}

const relative = (url) => url.replace(/^\//, ""); // "/thumbs/3" -> "thumbs/3", under the page's own path

async function loadImage(img, url) {
  // An <img src> cannot send an Authorization header: with a key, fetch the bytes and show a blob URL.
  if (!state.health?.auth) {
    img.src = relative(url);
    return img.src;
  }
  try {
    const res = await api(relative(url));
    const blobUrl = URL.createObjectURL(await res.blob());
    state.blobs.push(blobUrl);
    img.src = blobUrl;
    return blobUrl;
  } catch (e) {
    img.alt = `${img.alt} (not loaded: ${e.message})`;
    return null;
  }
}

function say(target, text, { error = false } = {}) {
  target.classList.toggle("error", error);
  target.textContent = text;
}

// ---- what the service offers -------------------------------------------------------------------------

function feature(name, on, flag) {
  const span = document.createElement("span");
  span.className = on ? "feature" : "feature off";
  if (on) {
    span.textContent = `${name}: ${on}`;
  } else {
    span.append(`${name}: off (start with `);
    const code = document.createElement("code");
    code.textContent = flag;
    span.append(code, ")");
  }
  return span;
}

async function loadHealth() {
  let h;
  try {
    h = await (await api("healthz")).json();
  } catch (e) {
    el.service.textContent = "";
    say(el.message, `Cannot talk to the service: ${e.message}`, { error: true });
    return;
  }
  state.health = h;
  el.service.replaceChildren();
  const plural = (n, word) => `${n.toLocaleString()} ${word}${n === 1 ? "" : "s"}`;
  const images = h.images === null ? "no index" : plural(h.images, "image") + (h.videos ? `, ${plural(h.videos, "video")}` : "");
  el.service.append(feature("model", h.model || "", "--model"),
    feature("index", h.images === null ? "" : images, "--db"),
    feature("captions", h.captioner || "", "--captioner"), feature("questions", h.answerer || "", "--answerer"));
  if (!el.labels.value && Array.isArray(h.labels)) el.labels.value = h.labels.join(", ");
  if (h.auth) {
    el.keyForm.hidden = false;
    el.key.value = state.key;
    if (!state.key) say(el.message, "This service needs an API key: enter it at the top of the page.");
  }
  if (!h.model || h.images === null) {
    el.summary.textContent = h.model
      ? "No image index is served: start the service with --db DIR (made by mmfusion index)."
      : "No model is loaded: start the service with --db DIR or --model NAME.";
  } else if (h.images === 0 && !h.videos) {
    el.summary.textContent = "The index holds no images yet: add some with mmfusion index.";
  }
  setupTools(h);
  loadCards({ api, loadImage, list: $("model-cards"), section: $("models") });
  const q = new URLSearchParams(location.search).get("q");
  if (q) {
    el.q.value = q;
    runSearch({ text: q });
  }
}

function showKeyForm() {
  el.keyForm.hidden = false;
}

function setupTools(h) {
  // Only what the service can do is offered; the hint names the flag that turns the rest on.
  el.question.hidden = el.ask.hidden = !h.answerer;
  el.caption.hidden = !h.captioner;
  el.askForm.hidden = !h.answerer && !h.captioner;
  const missing = [];
  if (!h.answerer) missing.push(["Questions need an answerer", "--answerer", "mmfusion train vqa"]);
  if (!h.captioner) missing.push(["Captions need a captioner", "--captioner", "mmfusion train caption"]);
  el.askHint.replaceChildren();
  el.askHint.hidden = missing.length === 0;
  const code = (text, cls) => Object.assign(document.createElement("code"), { textContent: text, className: cls });
  missing.forEach(([what, flag, train], i) => {
    el.askHint.append(`${i ? " " : ""}${what}: start the service with `, code(flag, "flag"), " (a run of ",
      code(train, ""), ", or an hf: model).");
  });
}

// ---- search ----------------------------------------------------------------------------------------------

async function runSearch(query) {
  // query: {text} | {file, text?} | {id, name}
  state.search?.abort();
  const ctrl = (state.search = new AbortController());
  el.grid.setAttribute("aria-busy", "true");
  say(el.message, "Searching…");
  try {
    let res;
    if (query.file) {
      const form = new FormData();
      form.append("image", query.file, query.file.name || "image");
      if (query.text) form.append("text", query.text);
      form.append("k", String(K));
      res = await api("search/upload", { form, signal: ctrl.signal });
    } else {
      const body = query.id !== undefined ? { id: query.id, k: K } : { text: query.text, k: K };
      res = await api("search", { json: body, signal: ctrl.signal });
    }
    const { results } = await res.json();
    if (ctrl.signal.aborted) return;
    renderResults(results, query);
    say(el.message, "");
    if (query.text && !query.file) history.replaceState(null, "", `?q=${encodeURIComponent(query.text)}`);
  } catch (e) {
    if (e.name === "AbortError") return;
    say(el.message, `Search failed: ${e.message}`, { error: true });
  } finally {
    if (state.search === ctrl) el.grid.setAttribute("aria-busy", "false");
  }
}

function describe(query) {
  if (query.id !== undefined) return `like ${query.name || `image ${query.id}`}`;
  if (query.file) return `like your image${query.text ? ` and “${query.text}”` : ""}`;
  return `for “${query.text}”`;
}

function renderResults(results, query) {
  state.blobs.forEach((u) => URL.revokeObjectURL(u));
  state.blobs = [];
  const n = results.length;
  el.summary.textContent = n
    ? `${n} result${n === 1 ? "" : "s"} ${describe(query)}, best first.`
    : `Nothing matched ${describe(query)}.`;
  el.grid.replaceChildren(...results.map((r, i) => card(r, i, query)));
}

function card(r, i, query) {
  const li = document.createElement("li");
  li.className = query.id === r.id ? "card query" : "card";
  li.dataset.id = r.id;
  li.draggable = true;
  li.addEventListener("dragstart", (e) => {
    e.dataTransfer.setData("application/x-mmfusion-id", String(r.id));
    e.dataTransfer.setData("text/plain", r.name);
    e.dataTransfer.effectAllowed = "copy";
  });

  const open = document.createElement("button");
  open.type = "button";
  open.className = "card-open";
  open.setAttribute("aria-label", `${r.name}, score ${r.score.toFixed(3)}, result ${i + 1}: open`);
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  const img = document.createElement("img");
  img.alt = r.name;
  img.width = img.height = 256;
  img.loading = "lazy";
  img.decoding = "async";
  img.draggable = false;
  loadImage(img, r.thumbnail_url);
  thumb.append(img);
  const meta = document.createElement("div");
  meta.className = "card-meta";
  const name = document.createElement("span");
  name.className = "card-name";
  name.textContent = r.name;
  name.title = r.name;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = r.score.toFixed(3);
  meta.append(name, score);
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.style.width = `${Math.max(0, Math.min(1, r.score)) * 100}%`;
  bar.append(fill);
  open.append(thumb, meta, bar);
  if (r.media === "video") markVideoCard(li, thumb, open, r);
  open.addEventListener("click", () => openPanel(r, open));

  const more = document.createElement("button");
  more.type = "button";
  more.className = "card-more";
  more.textContent = "More like this";
  more.setAttribute("aria-label", `More like ${r.name}`);
  more.addEventListener("click", () => moreLike(r));
  li.append(open, more);
  return li;
}

function moreLike(r) {
  clearExample();
  runSearch({ id: r.id, name: r.name }).then(() => el.grid.querySelector(".card-open")?.focus());
}

// ---- search by example: drop, paste or choose a file ----------------------------------------------------

function searchByExample(file) {
  if (file.type && !file.type.startsWith("image/")) {
    say(el.message, `${file.name || "That file"} is not an image (${file.type}); drop a photo or picture.`,
      { error: true });
    return;
  }
  state.example = file;
  if (state.exampleUrl) URL.revokeObjectURL(state.exampleUrl);
  state.exampleUrl = URL.createObjectURL(file);
  el.exampleImg.src = state.exampleUrl;
  el.exampleText.textContent = file.name ? ` (${file.name})` : "";
  el.example.hidden = false;
  runSearch({ file, text: el.q.value.trim() });
}

function clearExample() {
  state.example = null;
  el.example.hidden = true;
  if (state.exampleUrl) URL.revokeObjectURL(state.exampleUrl);
  state.exampleUrl = null;
}

function dropped(dt) {
  const id = dt.getData("application/x-mmfusion-id");
  if (id) {
    const name = dt.getData("text/plain");
    clearExample();
    runSearch({ id: Number(id), name });
    return;
  }
  const file = [...(dt.files || [])][0];
  if (file) searchByExample(file);
  else say(el.message, "Nothing to search by: drop an image file.", { error: true });
}

let dragDepth = 0;
const DROPPABLE = ["Files", "application/x-mmfusion-id"];
const carries = (e) => [...(e.dataTransfer?.types || [])].some((t) => DROPPABLE.includes(t));
function dragging(on) {
  document.body.classList.toggle("dragging", on);
  el.drop.classList.toggle("over", on);
}
document.addEventListener("dragenter", (e) => {
  if (!carries(e)) return;
  e.preventDefault();
  dragDepth += 1;
  dragging(true);
});
document.addEventListener("dragover", (e) => {
  if (!carries(e)) return;
  e.preventDefault(); // allows the drop
  e.dataTransfer.dropEffect = "copy";
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) dragging(false);
});
document.addEventListener("drop", (e) => {
  e.preventDefault(); // never let the browser navigate to the dropped file
  dragDepth = 0;
  dragging(false);
  if (e.dataTransfer) dropped(e.dataTransfer);
});
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) {
    e.preventDefault();
    searchByExample(file);
  }
});

el.pick.addEventListener("click", () => el.file.click());
el.file.addEventListener("change", () => {
  if (el.file.files[0]) searchByExample(el.file.files[0]);
  el.file.value = ""; // the same file can be chosen again
});
el.exampleClear.addEventListener("click", () => {
  clearExample();
  el.q.focus();
});
el.form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = el.q.value.trim();
  if (state.example) runSearch({ file: state.example, text });
  else if (text) runSearch({ text });
  else say(el.message, "Type a few words, or drop an image, to search.", { error: true });
});

// ---- the panel: one image, with more like this, questions, captions and labels --------------------------

function openPanel(r, opener) {
  state.current = r;
  state.opener = opener;
  el.panelTitle.textContent = r.name;
  el.panelImg.alt = r.name;
  el.panelImg.removeAttribute("src");
  el.panelMeta.textContent = `Image ${r.id} · score ${r.score.toFixed(3)}`;
  el.panelOpen.href = relative(r.image_url);
  el.panelOpen.hidden = Boolean(state.health?.auth); // a plain link cannot carry the key
  loadImage(el.panelImg, r.image_url);
  showVideo(r);
  el.answer.hidden = true;
  el.answerText.textContent = "";
  say(el.askError, "");
  say(el.labelsError, "");
  el.labelList.replaceChildren();
  if (!el.panel.open) el.panel.showModal();
  (el.question.hidden ? el.panelClose : el.question).focus();
  if (el.labels.value.trim()) classify();
}

function closePanel() {
  if (!el.panel.open) return;
  el.panel.close();
  returnFocus(); // now, not in the "close" event: that comes a task later, after the user may have moved on
}

function returnFocus() {
  const active = document.activeElement;
  const lost = !active || active === document.body || el.panel.contains(active);
  if (lost && state.opener?.isConnected) state.opener.focus();
}

el.panel.addEventListener("close", () => {
  $("panel-video")?.pause();
  state.tool?.abort();
  state.tool = null;
  returnFocus(); // closed some other way (a form's method="dialog", the browser): only if focus was lost
});
el.panelClose.addEventListener("click", closePanel);
el.panel.addEventListener("click", (e) => {
  if (e.target === el.panel) {
    // a click on the backdrop (outside the panel's box) closes it
    const box = el.panel.getBoundingClientRect();
    const inside = e.clientX >= box.left && e.clientX <= box.right && e.clientY >= box.top && e.clientY <= box.bottom;
    if (!inside) closePanel();
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && el.panel.open) {
    e.preventDefault();
    closePanel();
  }
});
el.panelMore.addEventListener("click", () => {
  const r = state.current;
  state.opener = null;
  closePanel();
  moreLike(r);
});

function imagePart(r) {
  // an indexed image by id; a video by the frame its result matched (what the card and the panel show)
  const url = r.media === "video" ? `mmfusion://videos/${r.id}?t=${r.metadata.thumb ?? r.start}` : `mmfusion://images/${r.id}`;
  return { type: "image_url", image_url: { url } };
}

async function generate(label, model, content) {
  // Streams a chat completion into the answer box (server-sent events read from fetch: EventSource cannot POST).
  state.tool?.abort();
  const ctrl = (state.tool = new AbortController());
  say(el.askError, "");
  el.answer.hidden = false;
  el.answerLabel.textContent = label;
  el.answerText.textContent = "";
  el.answer.setAttribute("aria-busy", "true");
  const body = { model, messages: [{ role: "user", content }], stream: true, max_tokens: 64 };
  try {
    const res = await api("v1/chat/completions", { json: body, signal: ctrl.signal });
    await readStream(res, (piece) => el.answerText.append(piece));
    if (!el.answerText.textContent.trim()) el.answerText.textContent = "(no answer)";
  } catch (e) {
    if (e.name === "AbortError") return;
    if (!el.answerText.textContent) el.answer.hidden = true;
    say(el.askError, `${label} failed: ${e.message}`, { error: true });
  } finally {
    el.answer.setAttribute("aria-busy", "false");
    if (state.tool === ctrl) state.tool = null;
  }
}

async function readStream(res, onPiece) {
  if (!(res.headers.get("content-type") || "").includes("text/event-stream")) {
    const data = await res.json(); // a server that did not stream: one whole completion
    onPiece(data.choices?.[0]?.message?.content ?? "");
    return;
  }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, "");
      buf = buf.slice(nl + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message || "the model failed", 500);
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) onPiece(piece);
    }
  }
}

el.askForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const question = el.question.value.trim();
  if (!question) {
    say(el.askError, "Type a question first, e.g. “What colour is the circle?”", { error: true });
    el.question.focus();
    return;
  }
  const content = [{ type: "text", text: question }, imagePart(state.current)];
  generate(`Answer to “${question}”`, state.health.answerer, content);
});
el.caption.addEventListener("click", () => generate("Caption", state.health.captioner, [imagePart(state.current)]));

async function classify() {
  const labels = el.labels.value.split(",").map((s) => s.trim()).filter(Boolean);
  if (!labels.length) {
    say(el.labelsError, "Give a few labels separated by commas, e.g. “a cat, a dog, a car”.", { error: true });
    return;
  }
  const r = state.current;
  say(el.labelsError, "Labelling…");
  try {
    const res = await api("classify", { json: { id: r.id, labels, k: Math.min(labels.length, 5) } });
    const out = await res.json();
    if (state.current !== r) return;
    el.labelList.replaceChildren(...out.labels.map((x) => labelRow(x, out.score)));
    say(el.labelsError, "");
  } catch (e) {
    say(el.labelsError, `Labels failed: ${e.message}`, { error: true });
  }
}

function labelRow(x, kind) {
  const li = document.createElement("li");
  const name = document.createElement("span");
  name.className = "label-name";
  name.textContent = x.label;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = kind === "cosine" ? x.score.toFixed(3) : `${Math.round(x.score * 100)}%`;
  const bar = document.createElement("span");
  bar.className = "label-bar";
  bar.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.style.width = `${Math.max(0, Math.min(1, x.score)) * 100}%`;
  bar.append(fill);
  li.append(name, score, bar);
  return li;
}

el.labelsForm.addEventListener("submit", (e) => {
  e.preventDefault();
  classify();
});

// ---- the API key --------------------------------------------------------------------------------------------

el.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = el.key.value.trim();
  if (state.key) localStorage.setItem(KEY_STORE, state.key);
  else localStorage.removeItem(KEY_STORE);
  say(el.message, state.key ? "Key saved in this browser." : "Key removed from this browser.");
});

function showVideo(r) {
  // a video result plays in the panel from its segment's start (video.js); an image hides the player
  playVideo(r, {
    video: $("panel-video"), img: el.panelImg, title: el.panelTitle, meta: el.panelMeta, link: el.panelOpen,
    auth: Boolean(state.health?.auth), fetchBlob: async (url) => (await api(relative(url))).blob(),
    keep: (blobUrl) => state.blobs.push(blobUrl), isCurrent: () => state.current === r,
  });
}

loadHealth();
