// The page. Cells mode: send dropped or chosen cell images to /api/v1/predict and show each one's result. Field photo
// mode: send one photo to /api/v1/smear, show the photo with its cells outlined and the counts; a tap on a cell shows
// it up close (cut from the overlay image here, so no crop images are sent), its label and probability.
// No external code, no inline scripts or styles (the CSP forbids them).
"use strict";

const state = { card: null, maxFiles: 32 };
// The field photo on show: the API's answer, the selected cell, and where "Next infected cell" is.
const field = { body: null, selected: null, infected: [], next: 0 };
const $ = (id) => document.getElementById(id);
// What heatmap=true draws, by the model card's heatmap_method: Grad-CAM needs a torch model; any model can be
// explained by painting patches of the cell over (occlusion), the shipped ONNX model included.
const HEATMAPS = {
  "grad-cam": { name: "Grad-CAM", title: "Grad-CAM: where the model's last layer saw evidence for its label" },
  occlusion: {
    name: "occlusion map",
    title: "Occlusion map: red where painting the cell over moves the model most away from its label",
  },
};

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
      `Model: ${card.model} (${card.backend}${q}) · Parasitized when P ≥ ${Number(card.threshold_in_use ?? card.threshold).toFixed(3)}` +
      (HEATMAPS[card.heatmap_method] ? ` · heatmaps: ${HEATMAPS[card.heatmap_method].name}` : "") +
      (card.detector ? ` · cell detector ${card.detector.source}` : "");
    // A model adapted on stain-normalized cells wants it: the box starts ticked (and can be unticked).
    $("stain-normalize").checked = Boolean(card.stain_normalize);
  } catch (e) {
    $("model").textContent = `Model information unavailable (${e.message}).`;
  }
}

function card(file) {
  const preview = el("img", { alt: `uploaded image ${file.name}`, src: URL.createObjectURL(file) });
  // A file the browser cannot show (not an image, corrupt) gets no preview box; the server says why below.
  preview.addEventListener("error", () => preview.closest("figure")?.remove());
  // The file name above says what the preview is: no caption under it (the heatmap beside it gets one).
  const node = el(
    "article",
    { class: "card", "data-testid": "result", "data-state": "pending" },
    el("p", { class: "name", text: file.name }),
    el("div", { class: "images" }, el("figure", {}, preview)),
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
  node.dataset.probability = String(result.prob_parasitized);
  const method = HEATMAPS[state.card && state.card.heatmap_method];
  if (result.heatmap && method) {
    const fig = el(
      "figure",
      { title: method.title },
      el("img", { alt: `${method.name} for ${result.filename}`, src: result.heatmap, "data-testid": "heatmap" }),
      el("figcaption", { text: method.name }),
    );
    node.querySelector(".images").append(fig);
  }
  const pct = Math.max(0, Math.min(1, result.prob_parasitized)) * 100;
  const thr = Math.max(0, Math.min(1, result.threshold));
  const bar = el("div", {
    class: "bar", role: "img",
    "aria-label": `probability ${pct.toFixed(1)} percent; Parasitized from ${(thr * 100).toFixed(1)} percent`,
  });
  const f = el("div", { class: "fill" });
  f.style.width = `${pct}%`;
  const t = el("div", { class: "thr" });
  t.style.left = `${thr * 100}%`;
  bar.append(f, t);
  // The tick's label, under it; near an end it is aligned to that end so it stays inside the card.
  const edge = thr < 0.25 ? " start" : thr > 0.75 ? " end" : "";
  const tick = el("span", { class: `thr-label${edge}`, "data-testid": "threshold", text: `threshold ${thr.toFixed(3)}` });
  tick.style.left = `${thr * 100}%`;
  node.append(
    el("span", { class: `label ${result.label}`, "data-testid": "label", text: result.label }),
    el("p", { class: "prob", "data-testid": "probability", text: `P(Parasitized) = ${result.prob_parasitized.toFixed(3)}` }),
    el("div", { class: "meter" }, bar, tick),
  );
  if (result.flag) {
    // The model answered, but the input is unlike the cells it was trained on: say so instead of a confident label.
    node.append(
      el("p", {
        class: "flag",
        "data-testid": "flag",
        text: `Not judged: ${result.flag}. The model alone would say ${result.raw_label}. It expects one stained cell on black (use Field photo for whole fields).`,
      }),
    );
  }
}

// POST a form; when the server is busy (503 server_busy) wait its Retry-After seconds and try again, 3 times at most.
async function post(url, form, statusId = "status") {
  for (let attempt = 0; ; attempt += 1) {
    const r = await fetch(url, { method: "POST", body: form });
    const body = await r.json();
    const busy = r.status === 503 && body.error && body.error.code === "server_busy";
    if (!busy || attempt >= 3) return body;
    const wait = Math.min(30, Number(r.headers.get("Retry-After")) || 2);
    $(statusId).textContent = `Server busy; trying again in ${wait} s…`;
    await new Promise((done) => setTimeout(done, wait * 1000));
  }
}

async function send(files) {
  const list = Array.from(files);
  if (!list.length) return;
  const nodes = list.map(card);
  $("results").prepend(...nodes);
  $("status").textContent = `Classifying ${list.length} image(s)…`;
  const heat = state.card && HEATMAPS[state.card.heatmap_method] ? "?heatmap=true" : "";
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
    if (body.warning) {
      // The served model is not meant for single cells (e.g. adapted on stain-normalized field photos): say so.
      $("cells-warning").textContent = `Note: ${body.warning}.`;
      $("cells-warning").hidden = false;
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

// ------------------------------------------------------------------------------------------------ field photo mode

const pct = (v, digits = 2) => `${Number(v).toFixed(digits)} %`;

function showField(body) {
  field.body = body;
  field.selected = null;
  // "Next infected cell" walks the cells called infected, most confident first (as a microscopist reviews them).
  field.infected = body.cells.filter((c) => c.label === "Parasitized")
    .sort((a, b) => b.prob_parasitized - a.prob_parasitized);
  field.next = 0;
  const s = body.summary;
  const para = $("parasitemia");
  if (s.parasitemia_pct === null) {
    para.textContent = "Parasitemia: no cells counted";
  } else {
    const [low, high] = s.ci95_pct.map((v) => Number(v).toFixed(2));
    para.replaceChildren(
      "Parasitemia ",
      el("strong", { text: pct(s.parasitemia_pct) }),
      " ",
      el("span", { class: "ci", text: `95 % CI ${low} – ${high} %` }),
    );
  }
  const left = [];
  if (s.border_cells) left.push(`${s.border_cells} cut by the edge`);
  if (s.unknown_cells) left.push(`${s.unknown_cells} not classified`);
  if (s.other_objects) {
    left.push(`${s.other_objects} other object${s.other_objects === 1 ? "" : "s"} (white cells, debris)`);
  }
  // Field photos are classified at the pipeline's threshold (the model's high-specificity point when it has one),
  // which is not the single-cell threshold in the page header: say which.
  $("counts").textContent = `${s.infected} infected of ${s.cells} counted red cells` +
    (left.length ? ` · not counted: ${left.join(", ")}` : "") +
    ` · infected when P ≥ ${Number(body.model.threshold).toFixed(3)}`;
  $("field-warning").hidden = !s.warning;
  $("field-warning").textContent = s.warning || "";
  const img = $("overlay");
  img.alt = `${body.filename} with its ${body.cells.length} cells outlined`;
  img.src = body.overlay;
  $("pick").hidden = true;
  $("detail-body").hidden = true;
  $("detail-hint").hidden = false;
  $("next-infected").hidden = field.infected.length === 0;
  const result = $("field-result");
  result.dataset.state = "done";
  result.dataset.cells = String(s.cells);
  result.dataset.infected = String(s.infected);
  result.hidden = false;
}

// The photo's pixels per CSS pixel of the overlay as shown now (it scales with the page's width).
function photoPerCss() {
  const rect = $("overlay").getBoundingClientRect();
  return { rect, k: field.body.width / rect.width };
}

// The cell under a tap: boxes containing the point, with some slack for a finger; the nearest centre wins.
function hitTest(clientX, clientY) {
  const { rect, k } = photoPerCss();
  const x = (clientX - rect.left) * k;
  const y = (clientY - rect.top) * k;
  const slack = 8 * k; // 8 CSS px around each box
  let best = null;
  let bestD = Infinity;
  for (const c of field.body.cells) {
    if (x < c.x - slack || x > c.x + c.w + slack || y < c.y - slack || y > c.y + c.h + slack) continue;
    const d = (x - c.x - c.w / 2) ** 2 + (y - c.y - c.h / 2) ** 2;
    if (d < bestD) { best = c; bestD = d; }
  }
  return best;
}

function describe(c) {
  if (c.on_border) return "Cut by the photo's edge: listed but not counted (count it in the neighbouring field).";
  if (c.label === "Unknown") return "No usable cell outline here: not classified and not counted.";
  if (c.label === "Other") return "Not a red cell (a white cell, platelets or debris): not counted.";
  return `Counted. Parasitized when P ≥ ${Number(field.body.model.threshold).toFixed(3)}.`;
}

function select(c) {
  field.selected = c;
  const { width: W, height: H } = field.body;
  const pick = $("pick");
  // Percentages of the photo: the mark stays on its cell however wide the overlay is drawn.
  pick.style.left = `${(c.x / W) * 100}%`;
  pick.style.top = `${(c.y / H) * 100}%`;
  pick.style.width = `${(c.w / W) * 100}%`;
  pick.style.height = `${(c.h / H) * 100}%`;
  pick.hidden = false;
  drawCrop(c);
  const label = $("detail-label");
  label.textContent = { Unknown: "Not classified", Other: "Not a red cell" }[c.label] || c.label;
  label.className = `label ${c.label}`;
  $("detail-prob").textContent = c.prob_parasitized === null
    ? "P(Parasitized): not computed"
    : `P(Parasitized) = ${c.prob_parasitized.toFixed(3)}`;
  $("detail-note").textContent = `Cell #${c.cell} · box ${c.w} × ${c.h} px at (${c.x}, ${c.y}). ${describe(c)}`;
  const detail = $("cell-detail");
  detail.dataset.cell = String(c.cell);
  detail.dataset.label = c.label;
  detail.dataset.probability = c.prob_parasitized === null ? "" : String(c.prob_parasitized);
  $("detail-hint").hidden = true;
  $("detail-body").hidden = false;
}

// The cell up close: a square around its box, cut from the overlay image the page already holds. The overlay is
// drawn from the very pixels the boxes were found in, so the crop matches the box for every format the server reads
// (a TIFF the browser cannot show, a JPEG whose EXIF rotation the browser would apply).
function drawCrop(c) {
  const img = $("overlay");
  const canvas = $("crop");
  const ctx = canvas.getContext("2d");
  if (!img.naturalWidth) return; // not decoded yet
  const k = img.naturalWidth / field.body.width; // overlay px per photo px (large photos get a smaller overlay)
  const side = Math.max(c.w, c.h) * 1.3; // the classifier's own margin (smear.CONTEXT): the box and a thin rim
  const sx = (c.x + c.w / 2 - side / 2) * k;
  const sy = (c.y + c.h / 2 - side / 2) * k;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(img, sx, sy, side * k, side * k, 0, 0, canvas.width, canvas.height);
}

function fieldError(message) {
  $("field-error").textContent = message;
  $("field-error").hidden = false;
  $("field-result").hidden = true;
  $("field-result").dataset.state = "error";
}

async function analyse(files) {
  const list = Array.from(files || []);
  if (!list.length) return;
  const file = list[0];
  $("field-error").hidden = true;
  $("field-result").dataset.state = "pending";
  const more = list.length > 1 ? ` (one photo at a time: ${list.length - 1} other(s) left out)` : "";
  $("field-status").textContent = `Analysing ${file.name}…${more}`;
  const form = new FormData();
  form.append("file", file, file.name);
  const t0 = performance.now();
  let body;
  try {
    // JPEG overlay: about a fifth of the PNG's bytes, which matters on a phone's connection.
    // The box starts at the model's own choice (ticked for a model adapted on stain-normalized cells).
    const stain = `&stain_normalize=${$("stain-normalize").checked}`;
    body = await post(`/api/v1/smear?overlay=true&overlay_format=jpeg${stain}`, form, "field-status");
  } catch (e) {
    body = { error: { message: `request failed (${e.message})` } };
  }
  if (!body.cells) {
    fieldError((body.error && body.error.message) || "no answer");
    $("field-status").textContent = `${file.name} could not be analysed.`;
    return;
  }
  showField(body);
  const secs = ((performance.now() - t0) / 1000).toFixed(1);
  $("field-status").textContent = `${body.filename}: ${body.cells.length} cells found in ${secs} s${more}.`;
}

function setMode(mode, focus = false) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const on = tab.dataset.mode === mode;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !on;
    if (on && focus) tab.focus();
  }
  // The mode is kept in the address (#field), so a reload or a shared link opens the same one.
  history.replaceState(null, "", mode === "field" ? "#field" : location.pathname + location.search);
}

function dropZone(zone, onFiles) {
  for (const ev of ["dragenter", "dragover"]) {
    zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (e) => onFiles(e.dataTransfer.files));
}

function setup() {
  $("files").addEventListener("change", (e) => { send(e.target.files); e.target.value = ""; });
  dropZone($("drop"), send);
  $("photo").addEventListener("change", (e) => { analyse(e.target.files); e.target.value = ""; });
  dropZone($("field-drop"), analyse);
  const tabs = Array.from(document.querySelectorAll("[role=tab]"));
  for (const tab of tabs) {
    tab.addEventListener("click", () => setMode(tab.dataset.mode));
    tab.addEventListener("keydown", (e) => { // arrow keys move between tabs (the WAI-ARIA tabs pattern)
      if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
      const i = (tabs.indexOf(tab) + (e.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length;
      setMode(tabs[i].dataset.mode, true);
    });
  }
  if (location.hash === "#field") setMode("field");
  $("overlay").addEventListener("click", (e) => {
    if (!field.body) return;
    const c = hitTest(e.clientX, e.clientY);
    if (c) {
      select(c);
      $("cell-detail").scrollIntoView({ block: "nearest", behavior: "smooth" });
    }
  });
  $("next-infected").addEventListener("click", () => {
    if (!field.infected.length) return;
    select(field.infected[field.next % field.infected.length]);
    field.next += 1;
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
