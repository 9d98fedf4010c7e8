// clipdistill search page: plain JS, no build step. Talks to POST /search (JSON for text,
// multipart for an image) and GET /indexes; the query lives in the URL (?q=...&k=...).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, imageName: "", imageUrl: null, defaultIndex: null, controller: null };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return { detail: `HTTP ${response.status} ${response.statusText}` };
  }
}

async function loadIndexes() {
  const response = await fetch("/indexes");
  const body = await readJson(response);
  if (!response.ok) throw new Error(body.detail || `GET /indexes failed (HTTP ${response.status})`);
  const select = $("index");
  select.replaceChildren();
  for (const info of body) {
    const option = document.createElement("option");
    option.value = info.name;
    option.textContent = `${info.name} (${info.count.toLocaleString()})`;
    option.dataset.info = `${info.model} · ${info.factory} · dim ${info.dim} · ${info.variant}`;
    if (info.default) {
      option.selected = true;
      state.defaultIndex = info.name;
    }
    select.append(option);
  }
  showIndexInfo();
}

function showIndexInfo() {
  const option = $("index").selectedOptions[0];
  $("index-info").textContent = option ? option.dataset.info : "";
}

function selectValue(select, value) {
  if ([...select.options].some((o) => o.value === value)) select.value = value;
}

// URL <-> controls. Returns true when the URL holds a text query to run.
function readUrl() {
  const params = new URLSearchParams(window.location.search);
  if (params.has("k")) {
    const k = params.get("k");
    if (![...$("k").options].some((o) => o.value === k)) {
      const option = document.createElement("option");
      option.textContent = k; // an unusual k from a shared link; the server validates it
      $("k").append(option);
    }
    $("k").value = k;
  }
  if (params.has("index")) selectValue($("index"), params.get("index"));
  if (params.has("target")) selectValue($("target"), params.get("target"));
  showIndexInfo();
  $("q").value = params.get("q") || "";
  return params.has("q");
}

function writeUrl(push) {
  const params = new URLSearchParams();
  if (!state.image) params.set("q", $("q").value);
  params.set("k", $("k").value);
  if ($("index").value && $("index").value !== state.defaultIndex) params.set("index", $("index").value);
  if ($("target").value !== "image") params.set("target", $("target").value);
  const url = `${window.location.pathname}?${params}`;
  if (url !== window.location.pathname + window.location.search) {
    if (push) window.history.pushState(null, "", url);
    else window.history.replaceState(null, "", url);
  }
}

function setImage(blob, name) {
  clearImage();
  state.image = blob;
  state.imageName = name || blob.name || "query";
  state.imageUrl = URL.createObjectURL(blob);
  $("query-image").src = state.imageUrl;
  $("query-image").hidden = false;
  $("clear-image").hidden = false;
  $("q").value = "";
  $("q").placeholder = `searching by image ${state.imageName} (type to search by text instead)`;
}

function clearImage() {
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.image = null;
  state.imageUrl = null;
  $("query-image").hidden = true;
  $("query-image").removeAttribute("src");
  $("clear-image").hidden = true;
  $("file").value = "";
  $("q").placeholder = "Describe what you are looking for, or drop an image here";
}

async function search({ push = true } = {}) {
  hideError();
  const k = $("k").value;
  const index = $("index").value || null;
  const target = $("target").value;
  let request;
  if (state.image) {
    const form = new FormData();
    form.append("image", state.image, state.imageName);
    form.append("k", k);
    if (index) form.append("index", index);
    form.append("target", target);
    request = { method: "POST", body: form };
  } else {
    const text = $("q").value;
    if (!text.trim()) {
      showError("Type a query, or drop or upload an image.");
      return;
    }
    const body = { text, k: Number(k), index, target };
    request = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  }
  writeUrl(push);
  if (state.controller) state.controller.abort(); // only the latest query may fill the grid
  const controller = new AbortController();
  state.controller = controller;
  document.body.classList.add("busy");
  try {
    const response = await fetch("/search", { ...request, signal: controller.signal });
    const body = await readJson(response);
    if (!response.ok) {
      render([]);
      $("status").textContent = "";
      showError(body.detail || `search failed (HTTP ${response.status})`);
      return;
    }
    render(body.hits);
    const what = state.image ? `image ${state.imageName}` : `“${$("q").value}”`;
    const t = body.timing_ms;
    $("status").textContent =
      `${body.hits.length} results for ${what} in ${body.index} (${body.target === "text" ? "captions" : "images"}) · ` +
      `${t.total.toFixed(1)} ms (encode ${t.encode.toFixed(1)}, search ${t.search.toFixed(1)})`;
  } catch (error) {
    if (error.name !== "AbortError") showError(`cannot reach the search service: ${error.message}`);
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      document.body.classList.remove("busy");
    }
  }
}

function render(hits) {
  const grid = $("results");
  grid.replaceChildren();
  $("empty").hidden = hits.length > 0 || Boolean($("status").textContent);
  hits.forEach((hit, rank) => {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.id = hit.id;
    card.title = `${hit.caption}\nid ${hit.id} · rank ${rank + 1} · score ${hit.score.toFixed(4)}\nclick: find similar images`;
    if (hit.image_url) {
      const img = document.createElement("img");
      img.src = hit.image_url;
      img.alt = hit.caption;
      img.loading = "lazy";
      img.addEventListener("click", () => searchByResult(hit));
      card.append(img);
    } else {
      const missing = document.createElement("div");
      missing.className = "no-thumb";
      missing.textContent = "no thumbnail";
      card.append(missing);
    }
    const caption = document.createElement("figcaption");
    const text = document.createElement("span");
    text.className = "caption";
    text.textContent = hit.caption;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    caption.append(text, score);
    card.append(caption);
    grid.append(card);
  });
}

async function searchByResult(hit) {
  try {
    const response = await fetch(hit.image_url);
    if (!response.ok) throw new Error((await readJson(response)).detail);
    setImage(await response.blob(), `${hit.id}.jpg`);
    await search();
  } catch (error) {
    showError(`cannot load ${hit.id}: ${error.message}`);
  }
}

async function fromDataTransfer(data) {
  const file = [...(data.files || [])][0];
  if (file) return file;
  const uri = (data.getData("text/uri-list") || "").split("\n")[0].trim();
  if (uri) {
    const response = await fetch(uri); // a result thumbnail dragged onto the page
    if (response.ok) return response.blob();
  }
  return null;
}

function init() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });
  $("q").addEventListener("input", () => {
    if (state.image && $("q").value) clearImage();
  });
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) {
      setImage(file, file.name);
      search();
    }
  });
  $("clear-image").addEventListener("click", () => {
    clearImage();
    $("q").focus();
  });
  for (const id of ["k", "index", "target"]) {
    $(id).addEventListener("change", () => {
      showIndexInfo();
      if (state.image || $("q").value.trim()) search();
      else writeUrl(false);
    });
  }

  // drag and drop anywhere on the page, and paste
  let depth = 0;
  const overlay = $("drop-overlay");
  window.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    overlay.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) overlay.hidden = true;
  });
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", async (event) => {
    event.preventDefault();
    depth = 0;
    overlay.hidden = true;
    const blob = await fromDataTransfer(event.dataTransfer);
    if (!blob) {
      showError("drop an image file (or a result thumbnail) to search by it");
      return;
    }
    setImage(blob, blob.name || "dropped image");
    search();
  });
  window.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files || [])][0];
    if (file) {
      event.preventDefault();
      setImage(file, file.name || "pasted image");
      search();
    }
  });
  window.addEventListener("popstate", () => {
    clearImage();
    if (readUrl()) search({ push: false });
  });

  loadIndexes()
    .then(() => {
      document.body.dataset.ready = "true";
      if (readUrl()) search({ push: false });
    })
    .catch((error) => showError(`cannot load the index list: ${error.message}`));
}

init();
