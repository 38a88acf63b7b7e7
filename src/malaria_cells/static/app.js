// The page: send dropped or chosen images to /api/v1/predict and show each one's result. No external code.
"use strict";

const state = { card: null, maxFiles: 32 };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

async function loadModel() {
  try {
    const r = await fetch("/api/v1/model");
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const card = await r.json();
    state.card = card;
    state.maxFiles = (card.limits && card.limits.max_files) || 32;
    const q = card.quantization && card.quantization.precision ? `, ${card.quantization.precision}` : "";
    $("model").textContent =
      `Model: ${card.model} (${card.backend}${q}) · Parasitized when P ≥ ${Number(card.threshold).toFixed(3)}` +
      (card.explainable ? " · Grad-CAM heatmaps on" : "");
  } catch (e) {
    $("model").textContent = `Model information unavailable (${e.message}).`;
  }
}

function card(file) {
  const preview = el("img", { alt: `uploaded image ${file.name}`, src: URL.createObjectURL(file) });
  // A file the browser cannot show (not an image, corrupt) gets no preview box; the server says why below.
  preview.addEventListener("error", () => preview.closest("figure")?.remove());
  const node = el(
    "article",
    { class: "card", "data-testid": "result", "data-state": "pending" },
    el("p", { class: "name", text: file.name }),
    el("div", { class: "images" }, el("figure", {}, preview, el("figcaption", { text: "image" }))),
    el("p", { class: "pending", text: "classifying…" }),
  );
  return node;
}

function fill(node, result) {
  node.querySelector(".pending")?.remove();
  if (!result.ok) {
    node.dataset.state = "error";
    node.append(el("p", { class: "error", "data-testid": "error", text: result.error.message }));
    return;
  }
  node.dataset.state = "done";
  node.dataset.label = result.label;
  node.dataset.probability = String(result.probability);
  if (result.heatmap) {
    const fig = el(
      "figure",
      {},
      el("img", { alt: `Grad-CAM heatmap for ${result.filename}`, src: result.heatmap, "data-testid": "heatmap" }),
      el("figcaption", { text: "Grad-CAM" }),
    );
    node.querySelector(".images").append(fig);
  }
  const pct = Math.max(0, Math.min(1, result.probability)) * 100;
  const bar = el("div", { class: "bar", role: "img", "aria-label": `probability ${pct.toFixed(1)} percent` });
  const f = el("div", { class: "fill" });
  f.style.width = `${pct}%`;
  const t = el("div", { class: "thr", title: "threshold" });
  t.style.left = `${Math.max(0, Math.min(1, result.threshold)) * 100}%`;
  bar.append(f, t);
  node.append(
    el("span", { class: `label ${result.label}`, "data-testid": "label", text: result.label }),
    el("p", { class: "prob", "data-testid": "probability", text: `P(Parasitized) = ${result.probability.toFixed(3)}` }),
    bar,
  );
}

// POST a form; when the server is busy (503 server_busy) wait its Retry-After seconds and try again, 3 times at most.
async function post(url, form) {
  for (let attempt = 0; ; attempt += 1) {
    const r = await fetch(url, { method: "POST", body: form });
    const body = await r.json();
    const busy = r.status === 503 && body.error && body.error.code === "server_busy";
    if (!busy || attempt >= 3) return body;
    const wait = Math.min(30, Number(r.headers.get("Retry-After")) || 2);
    $("status").textContent = `Server busy; trying again in ${wait} s…`;
    await new Promise((done) => setTimeout(done, wait * 1000));
  }
}

async function send(files) {
  const list = Array.from(files);
  if (!list.length) return;
  const nodes = list.map(card);
  $("results").prepend(...nodes);
  $("status").textContent = `Classifying ${list.length} image(s)…`;
  const heat = state.card && state.card.explainable ? "?heatmap=true" : "";
  let failed = 0;
  for (let a = 0; a < list.length; a += state.maxFiles) {
    const part = list.slice(a, a + state.maxFiles);
    const form = new FormData();
    for (const f of part) form.append("files", f, f.name);
    let body;
    try {
      body = await post(`/api/v1/predict${heat}`, form);
    } catch (e) {
      body = { error: { message: `request failed (${e.message})` } };
    }
    part.forEach((f, i) => {
      const result = (body.results && body.results[i]) || {
        ok: false, error: { message: (body.error && body.error.message) || "no answer" },
      };
      if (!result.ok) failed += 1;
      fill(nodes[a + i], result);
    });
  }
  $("status").textContent =
    `Done: ${list.length - failed} classified` + (failed ? `, ${failed} could not be read.` : ".");
}

function setup() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => { send(e.target.files); e.target.value = ""; });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => send(e.dataTransfer.files));
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
