// imgtrain ui: the page. Plain JavaScript, no library: every figure comes from the server's JSON, every name
// from the user's files is put in as text (never as HTML).
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { dataset: null, run: null, polling: null, models: [] };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function label(node, attrs, text) {
  const t = svg("text", attrs);
  t.textContent = text;
  node.append(t);
  return t;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

// --- Talking to the server: an error is one line, shown next to the control it belongs to ---------------

function clearErrors() { document.querySelectorAll(".error").forEach((node) => { node.textContent = ""; }); }

function showError(field, message) {
  const spot = document.querySelector(`.error[data-for="${field}"]`) || document.querySelector('.error[data-for="train"]');
  spot.textContent = message;
}

async function call(method, url, body, field) {
  const options = { method, headers: {} };
  if (body instanceof Blob || body instanceof FormData) options.body = body;
  else if (body !== undefined) { options.body = JSON.stringify(body); options.headers["Content-Type"] = "application/json"; }
  let response;
  try { response = await fetch(url, options); } catch (exc) {
    showError(field, "the server does not answer: is `imgtrain ui` still running?"); throw exc;
  }
  const data = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
  if (!response.ok) {
    const error = new Error(data.error);
    error.field = data.field || field;
    showError(error.field, data.error);
    throw error;
  }
  return data;
}
const get = (url, field) => call("GET", url, undefined, field);
const post = (url, body, field) => call("POST", url, body === undefined ? {} : body, field);
const quietly = (promise) => promise.catch(() => {});

// --- Tabs ------------------------------------------------------------------------------------------------

function showTab(name) {
  document.querySelectorAll("nav button").forEach((b) => b.setAttribute("aria-selected", String(b.dataset.tab === name)));
  document.querySelectorAll(".tab").forEach((t) => { t.hidden = t.id !== `tab-${name}`; });
  if (name === "evaluate") loadEvaluation();
  if (name === "export") showExport();
  if (name === "pipelines") quietly(refreshPipelines());
  if (name === "try") $("#try-run").textContent = state.run ? `(${state.run})` : "(no run yet)";
}
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));

// --- 1. Data ---------------------------------------------------------------------------------------------

async function browse(path) {
  const data = await get(`/api/browse${path ? `?path=${encodeURIComponent(path)}` : ""}`, "path");
  const list = $("#browse");
  list.replaceChildren();
  $("#browse-path").textContent = data.path || "Folders this page may open:";
  if (data.parent) list.append(el("li", { text: "\u2191 ..", onclick: () => quietly(browse(data.parent)) }));
  for (const name of data.folders) {
    const full = data.path ? `${data.path}/${name}` : name;
    list.append(el("li", { text: `${data.path ? name : full}/`, "data-path": full,
      onclick: () => { $("#path").value = full; quietly(browse(full)); } }));
  }
  for (const name of data.archives) {
    const full = `${data.path}/${name}`;
    list.append(el("li", { text: `${name} (archive)`, onclick: () => { $("#path").value = full; } }));
  }
}

async function openFolder() {
  clearErrors();
  clearTimeout(state.datasetPolling);
  const data = await post("/api/datasets", { path: $("#path").value }, "path");
  showDataset(data);
}

function knowDataset(name) {
  const select = $("#validation_dataset");
  if (![...select.options].some((o) => o.value === name)) select.append(el("option", { value: name, text: name }));
}

function showDataset(data) {
  knowDataset(data.name);
  const changed = !state.dataset || state.dataset.name !== data.name || state.dataset.converted !== data.converted
    || state.dataset.images !== data.images;
  state.dataset = data;
  $("#dataset").hidden = false;
  $("#train-dataset").textContent = `${data.name} (${data.images.toLocaleString()} images, ${data.classes.length} classes)`;
  $("#dataset-title").textContent = `${data.name}: ${data.images.toLocaleString()} images in ${data.classes.length} classes`;
  const job = data.job || {};
  $("#dataset-state").textContent = job.state === "running" ? "Converting (checking every image)\u2026"
    : data.converted ? `Converted to an ImageDirectory: ${data.source}` : job.state === "failed" ? "" : data.source;
  if (job.state === "failed" || job.state === "stopped") showError("path", job.error || "the conversion failed");
  showAudit(data);
  if (changed) showClasses(data);
  clearTimeout(state.datasetPolling);
  if (job.state === "running") {  // until its conversion ends; a data set opened meanwhile ends this one's polling
    state.datasetPolling = setTimeout(() => quietly(get(`/api/datasets/${data.name}`, "path").then((d) => {
      if (state.dataset && state.dataset.name === d.name) showDataset(d);
    })), 800);
  }
}

function showAudit(data) {
  const audit = data.audit;
  const box = $("#audit");
  box.replaceChildren();
  const counts = data.classes.map((c) => c.count).filter((n) => n > 0);
  const items = [];
  if (counts.length > 1) {
    const ratio = Math.max(...counts) / Math.min(...counts);
    items.push(`Imbalance: the largest class has ${ratio.toFixed(1)}\u00d7 the images of the smallest`);
  }
  for (const c of data.classes) if (c.count === 1) items.push(`Class ${c.name} has one image: training needs more`);
  if (audit) {
    const rejected = audit.rejected_count ?? (audit.rejected || []).length;
    items.push(`${rejected} file(s) left out${rejected ? ":" : ""}`);
    const dup = audit.duplicates_count ?? (audit.duplicates || []).length;
    const across = audit.duplicates_with_different_categories_count ?? 0;
    items.push(`${dup} group(s) of duplicate images` + (across ? `, ${across} of them in different classes (conflicting labels)` : ""));
    if ((audit.empty_categories || []).length) items.push(`Empty class folders: ${audit.empty_categories.join(", ")}`);
    if (audit.outside_categories) items.push(`${audit.outside_categories} image(s) beside the class folders, left out`);
    if (audit.not_images) items.push(`${audit.not_images} file(s) without an image extension, passed over`);
  }
  const list = el("ul", { class: "audit", id: "audit-list" });
  for (const text of items) list.append(el("li", { text }));
  if (audit && audit.rejected) {
    for (const r of audit.rejected.slice(0, 20)) {
      const file = r.file || "", reason = r.reason || "";
      list.append(el("li", { class: "muted", text: `\u2003${file}: ${reason}` }));
    }
  }
  box.append(list);
}

function showClasses(data) {
  const box = $("#classes");
  box.replaceChildren();
  data.classes.forEach((c, index) => {
    const scroll = el("div", { class: "scroll" });
    const column = el("div", { class: "class", "data-class": c.name },
      el("h3", { text: `${c.name || "(no class)"} \u00b7 ${c.count.toLocaleString()}` }), scroll);
    box.append(column);
    pagedThumbnails(scroll, data.name, index);
  });
}

// A class's thumbnails arrive a page at a time, when the end of the column scrolls into view.
function pagedThumbnails(scroll, name, index) {
  let next = 0, total = Infinity, busy = false;
  const sentinel = el("div", { style: "width:100%;height:1px" });
  scroll.append(sentinel);
  const more = async () => {
    if (busy || next >= total) return;
    busy = true;
    try {
      const page = await get(`/api/datasets/${name}/images?class=${index}&start=${next}&count=48`, "path");
      total = page.total;
      for (const image of page.images) {
        scroll.insertBefore(el("img", { class: "thumb", loading: "lazy", alt: image.name, title: image.name,
          src: `/api/datasets/${name}/thumbnail/${index}/${image.number}?v=${page.version}` }), sentinel);
      }
      next += page.images.length;
    } finally { busy = false; }
    if (sentinel.getBoundingClientRect().top < scroll.getBoundingClientRect().bottom + 200) quietly(more());
  };
  new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) quietly(more()); },
    { root: scroll, rootMargin: "200px" }).observe(sentinel);
}

// A dropped (or chosen) folder: its image files sent one by one to the workspace, then opened as any folder.
async function upload(files) {
  clearErrors();
  if (!files.length) return;
  const stamp = new Date().toISOString().replace(/[-:T]/g, "").slice(0, 14);
  const folder = `dropped-${stamp}`;
  let done = 0, leftOut = [], target = null;
  const status = $("#upload-state");
  const queue = files.slice();
  const worker = async () => {
    while (queue.length) {
      const { file, path } = queue.shift();
      const response = await fetch(`/api/uploads?folder=${folder}&path=${encodeURIComponent(path)}`, { method: "POST", body: file });
      const answer = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
      if (response.ok) target = answer.folder; else leftOut.push(answer.error);
      done += 1;
      status.textContent = `uploading: ${done} of ${files.length} files`;
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  status.textContent = `${done - leftOut.length} of ${files.length} files uploaded` + (leftOut.length ? `; ${leftOut.length} left out: ${leftOut[0]}` : "");
  if (!target) { showError("path", leftOut[0] || "no image file was uploaded"); return; }
  $("#path").value = target;
  await openFolder();
}

async function entries(entry, prefix) {  // a dropped folder, walked as the browser lists it
  if (entry.isFile) return [await new Promise((ok, fail) => entry.file((file) => ok({ file, path: prefix + file.name }), fail))];
  const reader = entry.createReader(), found = [];
  for (;;) {
    const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
    if (!batch.length) break;
    for (const child of batch) found.push(...await entries(child, `${prefix}${entry.name}/`));
  }
  return found;
}

const folderDrop = $("#folder-drop");
folderDrop.addEventListener("dragover", (e) => { e.preventDefault(); folderDrop.classList.add("over"); });
folderDrop.addEventListener("dragleave", () => folderDrop.classList.remove("over"));
folderDrop.addEventListener("drop", async (e) => {
  e.preventDefault(); folderDrop.classList.remove("over");
  const roots = [...e.dataTransfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  const files = roots.length ? (await Promise.all(roots.map((r) => entries(r, "")))).flat()
    : [...e.dataTransfer.files].map((file) => ({ file, path: file.name }));
  quietly(upload(files));
});
$("#upload-folder").addEventListener("change", (e) => {
  quietly(upload([...e.target.files].map((file) => ({ file, path: file.webkitRelativePath || file.name }))));
});

$("#open").addEventListener("click", () => quietly(openFolder()));
$("#path").addEventListener("keydown", (e) => { if (e.key === "Enter") quietly(openFolder()); });

// --- 2. Model and training -------------------------------------------------------------------------------

function showModels() {
  const filter = $("#model-filter").value.toLowerCase();
  const body = $("#models tbody");
  body.replaceChildren();
  for (const m of state.models) {
    if (filter && !m.name.includes(filter) && !m.family.includes(filter)) continue;
    const row = el("tr", { "data-model": m.name, class: m.name === $("#model_name").value ? "chosen" : "",
      onclick: () => { $("#model_name").value = m.name; showModels(); } },
      el("td", { text: m.name }), el("td", { text: m.family }), el("td", { text: m.params_m }),
      el("td", { text: m.gflops }), el("td", { text: m.top1 == null ? "\u2013" : `${m.top1}%` }),
      el("td", { text: m.image_size }), el("td", { text: m.speed == null ? "\u2013" : m.speed }));
    body.append(row);
  }
}
$("#model-filter").addEventListener("input", showModels);
$("#measure-speed").addEventListener("click", async () => {
  clearErrors();
  const name = $("#model_name").value.trim();
  $("#speed").textContent = `measuring ${name}\u2026`;
  $("#measure-speed").disabled = true;
  try {
    const answer = await post(`/api/models/${encodeURIComponent(name)}/speed`, {}, "model_name");
    $("#speed").textContent = `${answer.model_name} scores ${answer.images_per_second} images/s here at ${answer.image_size} px (batches of 8)`;
    const row = state.models.find((m) => m.name === answer.model_name && m.image_size === answer.image_size);
    if (row) { row.speed = answer.images_per_second; showModels(); }
  } catch (exc) { $("#speed").textContent = ""; } finally { $("#measure-speed").disabled = false; }
});

async function train() {
  clearErrors();
  const value = (id) => $(`#${id}`).value.trim();
  const body = { dataset: state.dataset && state.dataset.name, model_name: value("model_name"),
    pretrained: $("#pretrained").checked, validation_share: value("validation_share"), name: value("run_name") || undefined,
    validation_dataset: $("#validation_dataset").value || undefined };
  for (const key of ["epochs", "batch_size", "learning_rate", "random_seed", "patience", "image_size"]) body[key] = value(key);
  $("#train").disabled = true;
  try {
    const run = await post("/api/runs", body, "train");
    await refreshRuns(run.name);
    showRun(run);
  } finally { $("#train").disabled = false; }
}
$("#train").addEventListener("click", () => quietly(train()));

async function refreshRuns(chosen) {
  const runs = await get("/api/runs", "run");
  const select = $("#run-select");
  select.replaceChildren(...runs.map((r) => el("option", { value: r.name, text: `${r.name} \u00b7 ${r.model_name} on ${r.dataset} \u00b7 ${r.state}` })));
  state.run = chosen || (runs[0] && runs[0].name) || null;
  if (state.run) select.value = state.run;
}

$("#run-select").addEventListener("change", () => { state.run = $("#run-select").value; quietly(pollRun()); });
$("#stop").addEventListener("click", () => { clearErrors(); quietly(post(`/api/runs/${state.run}/stop`, {}, "stop").then(pollRun)); });
$("#resume").addEventListener("click", () => { clearErrors(); quietly(post(`/api/runs/${state.run}/resume`, {}, "resume").then(showRun)); });

function fmtSeconds(s) { return s >= 90 ? `${Math.round(s / 60)} min` : `${Math.round(s)} s`; }

function showRun(run) {
  state.run = run.name;
  const job = run.job || {};
  const last = run.history[run.history.length - 1];
  const parts = [`${run.name}: ${job.state || "none"}`];
  if (job.state === "running" && job.running) parts.push(`running ${job.running}`);
  if (last) {
    parts.push(`epoch ${last.epoch} of ${run.epochs}`, `${Math.round(last.train_images_per_second)} images/s`,
      `validation accuracy ${(100 * last.validation_top1_accuracy).toFixed(1)}%`);
  }
  const scored = run.history.filter((h) => h.validation_loss != null && isFinite(h.validation_loss));
  if (scored.length > 1) {  // the weights kept: the epoch of the lowest validation loss, as training keeps them
    const best = scored.reduce((a, b) => (b.validation_loss < a.validation_loss ? b : a));
    parts.push(`best epoch ${best.epoch} (kept): ${(100 * best.validation_top1_accuracy).toFixed(1)}%`);
  }
  if (run.eta_seconds != null) parts.push(`about ${fmtSeconds(run.eta_seconds)} left`);
  $("#run-state").textContent = parts.join(" \u00b7 ");
  const split = (run.run || {}).split;
  $("#run-split").textContent = split ? ["training", "validation"].map((side) => `${side}: ` +
    Object.entries(split[side]).map(([c, n]) => `${c} ${n}`).join(", ")).join(" \u00b7 ") : "";
  $("#run-state").dataset.state = job.state || "none";
  $("#run-state").dataset.epochs = String(run.history.length);
  const errorSpot = document.querySelector('.error[data-for="run"]');
  errorSpot.textContent = job.state === "failed" ? (job.error || "the run failed") : "";
  $("#run-log").textContent = job.log || "";
  $("#stop").disabled = job.state !== "running";
  $("#resume").disabled = job.state === "running" || job.state === "done";
  chart($("#loss-chart"), run.history, [["train_loss", "training"], ["validation_loss", "validation"]], false);
  chart($("#accuracy-chart"), run.history, [["validation_top1_accuracy", "top-1"], ["validation_top5_accuracy", "top-5"]], true);
  clearTimeout(state.polling);
  if (job.state === "running") state.polling = setTimeout(() => quietly(pollRun()), 1000);
  else quietly(refreshRuns(run.name));
}

async function pollRun() {
  if (!state.run) return;
  showRun(await get(`/api/runs/${state.run}`, "run"));
}

// A line chart in SVG: each series its own dash and marker shape, named in the legend (readable without colour).
function chart(node, history, series, percent) {
  node.replaceChildren();
  const W = 420, H = 240, left = 48, right = 12, top = 14, bottom = 34;
  const epochs = history.map((h) => h.epoch);
  const values = series.flatMap(([key]) => history.map((h) => h[key]).filter((v) => v != null && isFinite(v)));
  if (!values.length) { label(node, { x: 150, y: 120 }, "no epoch yet"); return; }
  let lo = Math.min(...values), hi = Math.max(...values);
  if (percent) { lo = Math.min(lo, 0); hi = Math.max(hi, 1); }
  if (hi === lo) { hi += 1; lo = Math.max(0, lo - 1); }
  const maxEpoch = Math.max(...epochs, 2);
  const x = (e) => left + (W - left - right) * (e - 1) / (maxEpoch - 1);
  const y = (v) => top + (H - top - bottom) * (1 - (v - lo) / (hi - lo));
  node.append(svg("line", { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, stroke: "#888" }));
  node.append(svg("line", { x1: left, y1: top, x2: left, y2: H - bottom, stroke: "#888" }));
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4;
    label(node, { x: 4, y: y(v) + 4 }, percent ? `${(100 * v).toFixed(0)}%` : v.toFixed(2));
  }
  for (const e of epochs) label(node, { x: x(e) - 3, y: H - bottom + 14 }, String(e));
  label(node, { x: W / 2 - 15, y: H - 4 }, "epoch");
  const styles = [{ dash: "", marker: "circle", color: "#0b5cad" }, { dash: "6 4", marker: "square", color: "#b35c00" }];
  series.forEach(([key, name], i) => {
    const points = history.filter((h) => h[key] != null && isFinite(h[key]));
    if (!points.length) return;
    const s = styles[i];
    node.append(svg("polyline", { points: points.map((h) => `${x(h.epoch)},${y(h[key])}`).join(" "), fill: "none",
      stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash, "data-series": key }));
    for (const h of points) {
      const mark = s.marker === "circle" ? svg("circle", { cx: x(h.epoch), cy: y(h[key]), r: 4, fill: s.color })
        : svg("rect", { x: x(h.epoch) - 4, y: y(h[key]) - 4, width: 8, height: 8, fill: s.color });
      mark.setAttribute("class", "point");
      mark.append(svg("title")); mark.firstChild.textContent = `${name}, epoch ${h.epoch}: ${h[key].toFixed(4)}`;
      node.append(mark);
    }
    const ly = top + 4 + 16 * i;
    node.append(svg("line", { x1: W - 130, y1: ly, x2: W - 100, y2: ly, stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash }));
    label(node, { x: W - 95, y: ly + 4 }, name);
  });
}

// --- 3. Evaluate -----------------------------------------------------------------------------------------

async function loadEvaluation() {
  clearErrors();
  $("#evaluate-run").textContent = state.run ? `(${state.run})` : "";
  if (!state.run) { showError("evaluate", "no run yet: train one first"); return; }
  const run = await get(`/api/runs/${state.run}`, "evaluate");
  const ev = run.evaluation;
  const matrix = $("#confusion"), perClass = $("#per-class");
  matrix.replaceChildren(); perClass.replaceChildren(); $("#cell-images").replaceChildren(); $("#cell-title").textContent = "";
  $("#mistakes").replaceChildren(); $("#mistakes-note").textContent = "";
  if (!ev) {
    $("#evaluate-summary").textContent = run.job.state === "running" ? "The run is still going: its evaluation comes at its end."
      : "This run has no evaluation (it was stopped or failed): resume it on the training tab.";
    return;
  }
  $("#evaluate-summary").textContent = `Accuracy ${(100 * ev.accuracy).toFixed(2)}%, macro F1 ${ev.f1_macro.toFixed(4)}, on ${ev.num_images} validation images`;
  const labels = ev.confusion_matrix.labels, counts = ev.confusion_matrix.counts;
  matrix.append(el("tr", {}, el("th", { text: "true \\ predicted" }), ...labels.map((l) => el("th", { text: l }))));
  const most = Math.max(1, ...counts.flat());
  labels.forEach((truth, i) => {
    const row = el("tr", {}, el("th", { text: truth }));
    labels.forEach((predicted, j) => {
      const n = counts[i][j];
      const shade = Math.round(255 - 150 * n / most);
      const cell = el("td", { text: n, class: i === j ? "diagonal" : "", "data-truth": truth, "data-predicted": predicted,
        style: `background: rgb(${shade},${shade},255)`, title: `${n} image(s) of ${truth} predicted as ${predicted}`,
        onclick: () => quietly(showCell(cell, truth, predicted)) });
      row.append(cell);
    });
    matrix.append(row);
  });
  showMistakes(run);
  perClass.append(el("tr", {}, ...["class", "precision", "recall", "F1", "images"].map((t) => el("th", { text: t }))));
  for (const [label, m] of Object.entries(ev.per_class || {})) {
    perClass.append(el("tr", {}, el("td", { text: label }), el("td", { text: m.precision.toFixed(3) }),
      el("td", { text: m.recall.toFixed(3) }), el("td", { text: m.f1.toFixed(3) }), el("td", { text: m.support })));
  }
}

// `imgtrain explain` on the validation share: the mistakes first, the most confident first (Grad-CAM overlays).
function showMistakes(run) {
  const box = $("#mistakes");
  const shown = run.explanations || [];
  const wrong = shown.filter((e) => e.truth != null && e.truth !== e.predicted);
  $("#mistakes-note").textContent = !shown.length
    ? "No explanations: they need imgtrain[explain] (Captum), and a run that finished."
    : wrong.length ? `${wrong.length} mistake(s), the most confident first; then images it got right.`
      : "No mistakes on the validation images: where it looked at some of them.";
  box.replaceChildren(...shown.map((e, n) => el("figure", { "data-mistake": String(e.truth !== e.predicted) },
    el("img", { src: `/api/runs/${run.name}/explanation/${n}`, alt: `where the model looked in ${e.image}` }),
    el("figcaption", { text: `${e.image}: ${e.truth ?? "?"} predicted as ${e.predicted} (${(100 * e.probability).toFixed(0)}%), ${e.method}` }))));
}

async function showCell(cell, truth, predicted) {
  document.querySelectorAll(".matrix td.chosen").forEach((c) => c.classList.remove("chosen"));
  cell.classList.add("chosen");
  const images = await get(`/api/runs/${state.run}/cell?truth=${encodeURIComponent(truth)}&predicted=${encodeURIComponent(predicted)}`, "evaluate");
  $("#cell-title").textContent = `${images.length} image(s) of ${truth} predicted as ${predicted}`;
  $("#cell-images").replaceChildren(...images.slice(0, 200).map((image) => el("figure", {},
    el("img", { src: `/api/runs/${state.run}/scored/${image.row}/thumbnail`, alt: image.image, loading: "lazy" }),
    el("figcaption", { text: `${image.image} (${(100 * image.confidence).toFixed(0)}%)` }))));
}

// --- 4. Try it -------------------------------------------------------------------------------------------

async function predict(blob) {
  clearErrors();
  if (!state.run) { showError("predict", "no run yet: train one first"); return; }
  const image = $("#predict-image");
  image.src = URL.createObjectURL(blob); image.hidden = false;
  const answer = await call("POST", `/api/runs/${state.run}/predict`, blob, "predict");
  const ranked = Object.entries(answer.probabilities).sort((a, b) => b[1] - a[1]).slice(0, 5);
  $("#predictions").replaceChildren(...ranked.map(([label, p]) => el("li", { "data-label": label },
    `${label}: ${(100 * p).toFixed(1)}%`, el("span", { class: "bar", style: `width:${Math.round(200 * p)}px` }))));
}

$("#import").addEventListener("click", () => {
  clearErrors();
  quietly(post("/api/runs/import", { path: $("#import-path").value }, "import").then(async (run) => {
    await refreshRuns(run.name);
    $("#try-run").textContent = `(${run.name})`;
  }));
});

$("#predict-file").addEventListener("change", (e) => { if (e.target.files[0]) quietly(predict(e.target.files[0])); });
const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) quietly(predict(e.dataTransfer.files[0]));
});
document.addEventListener("paste", (e) => {
  if ($("#tab-try").hidden) return;
  const file = [...e.clipboardData.files].find((f) => f.type.startsWith("image/"));
  if (file) quietly(predict(file));
});
$("#webcam").addEventListener("click", async () => {
  clearErrors();
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: true });
    $("#video").srcObject = stream; $("#video").hidden = false; $("#capture").hidden = false;
  } catch (exc) { showError("predict", `the webcam cannot be opened (${exc.name}): allow it in the browser, or choose a file`); }
});
$("#capture").addEventListener("click", () => {
  const video = $("#video"), canvas = document.createElement("canvas");
  canvas.width = video.videoWidth || 320; canvas.height = video.videoHeight || 240;
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  canvas.toBlob((blob) => quietly(predict(blob)), "image/png");
});

// --- 5. Export -------------------------------------------------------------------------------------------

async function showExport(run) {
  $("#export-run").textContent = state.run ? `(${state.run})` : "";
  if (!state.run) return;
  run = run || await get(`/api/runs/${state.run}`, "export");
  $("#download-zip").href = `/api/runs/${run.name}/download/model.zip`;
  const list = $("#downloads");
  list.replaceChildren();
  for (const fmt of run.exports) {
    const file = fmt === "onnx" ? "model.onnx" : "model.pt2";
    for (const name of [file, `${fmt}-metadata.json`, `${fmt}-preprocess.py`]) {
      list.append(el("li", {}, el("a", { href: `/api/runs/${run.name}/download/${name}`, download: "", text: name })));
    }
  }
  const model = `${run.folder}/trained`;
  $("#serve-command").textContent = `imgtrain serve ${model} --name ${run.name} --port 8080\n\n` +
    `curl -s --data-binary @picture.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8080/predictions/${run.name}`;
}

async function exportAs(format) {
  clearErrors();
  if (!state.run) { showError("export", "no run yet: train one first"); return; }
  const buttons = [$("#export-onnx"), $("#export-pt2")];
  buttons.forEach((b) => { b.disabled = true; });
  try { showExport(await post(`/api/runs/${state.run}/export`, { format }, "export")); }
  finally { buttons.forEach((b) => { b.disabled = false; }); }
}
$("#export-onnx").addEventListener("click", () => quietly(exportAs("onnx")));
$("#export-pt2").addEventListener("click", () => quietly(exportAs("pt2")));

// --- Pipelines: the designer's canvas --------------------------------------------------------------------

const STATE_WORDS = { "reused": "\u2713 reused from the cache", "ran": "\u2713 ran", "running": "\u25B6 running\u2026",
  "failed": "\u2717 failed", "stopped": "\u2717 stopped", "will run": "\u25CB will run" };

async function refreshPipelines(chosen) {
  const list = await get("/api/pipelines", "pipeline");
  $("#pipeline-select").replaceChildren(...list.map((p) => el("option", { value: p.name, text: p.name })));
  state.pipeline = chosen || state.pipeline || (list[0] && list[0].name) || null;
  if (state.pipeline) { $("#pipeline-select").value = state.pipeline; await loadPipeline(); }
}

async function loadPipeline() {
  if (!state.pipeline) return;
  const data = await get(`/api/pipelines/${state.pipeline}`, "pipeline");
  drawPipeline(data);
  const job = data.job || {};
  $("#pipeline-state").textContent = `${data.path}: ${job.state === "none" ? "not run from this page yet" : job.state}`;
  $("#pipeline-state").dataset.state = job.state || "none";
  $("#pipeline-log").textContent = job.log || "";
  if (job.state === "failed") showError("pipeline", job.error || "the run failed");
  $("#pipeline-run").disabled = job.state === "running";
  clearTimeout(state.pipelinePolling);
  if (job.state === "running") state.pipelinePolling = setTimeout(() => quietly(loadPipeline()), 1000);
}

// Columns by depth: the pipeline's inputs first, then each step one column right of what it reads.
function drawPipeline(data) {
  const canvas = $("#canvas");
  canvas.replaceChildren();
  const depth = {}, column = {};
  for (const input of data.inputs) depth[`input:${input.name}`] = 0;
  for (const step of data.steps) {
    const from = Object.values(step.inputs).map((s) => s.input !== undefined ? depth[`input:${s.input}`] : depth[s.step]);
    depth[step.name] = 1 + Math.max(0, ...from.filter((d) => d !== undefined));
  }
  const W = 190, H = 64, GX = 70, GY = 26, pos = {};
  const nodes = [...data.inputs.map((i) => ({ id: `input:${i.name}`, title: i.name, sub: i.kind, input: true })),
    ...data.steps.map((s) => ({ id: s.name, title: s.name, sub: s.component, step: s }))];
  for (const node of nodes) {
    const d = depth[node.id];
    column[d] = (column[d] || 0) + 1;
    pos[node.id] = { x: 10 + d * (W + GX), y: 10 + (column[d] - 1) * (H + GY) };
  }
  const width = 20 + (Math.max(...Object.values(depth)) + 1) * (W + GX), height = 20 + Math.max(...Object.values(column)) * (H + GY);
  canvas.setAttribute("viewBox", `0 0 ${width} ${height}`);
  canvas.style.maxWidth = `${width}px`;
  for (const step of data.steps) {
    for (const [port, s] of Object.entries(step.inputs)) {
      const a = pos[s.input !== undefined ? `input:${s.input}` : s.step], b = pos[step.name];
      if (!a || !b) continue;
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
      const edge = svg("path", { d: `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}`,
        "data-from": s.input !== undefined ? s.input : `${s.step}.${s.port}`, "data-to": `${step.name}.${port}` });
      edge.append(svg("title")); edge.firstChild.textContent = `${s.input !== undefined ? s.input : `${s.step}.${s.port}`} \u2192 ${step.name}.${port}`;
      canvas.append(edge);
    }
  }
  for (const node of nodes) {
    const p = pos[node.id];
    const group = svg("g", { class: node.input ? "input" : "step", transform: `translate(${p.x},${p.y})` });
    if (node.step) { group.setAttribute("data-step", node.step.name); group.setAttribute("data-state", node.step.state); }
    group.append(svg("rect", { width: W, height: H, rx: 6 }));
    label(group, { x: 10, y: 20, "font-weight": "600" }, node.title);
    label(group, { x: 10, y: 37 }, node.sub);
    if (node.step) {
      label(group, { x: 10, y: 54, class: "state" }, STATE_WORDS[node.step.state] || node.step.state);
      group.addEventListener("click", () => quietly(showStepOutputs(node.step.name)));
    }
    canvas.append(group);
  }
}

async function showStepOutputs(step) {
  const data = await get(`/api/pipelines/${state.pipeline}/steps/${encodeURIComponent(step)}`, "pipeline");
  const box = $("#step-outputs");
  box.replaceChildren(el("h3", { text: `Step ${step}` }));
  if (!data.folder) { box.append(el("p", { class: "muted", text: "Not in the cache yet: run the pipeline." })); return; }
  box.append(el("p", { class: "muted", text: `Its outputs, in the cache: ${data.folder}` }));
  if (data.accuracy != null) box.append(el("p", { text: `Accuracy ${(100 * data.accuracy).toFixed(2)}%` }));
  for (const [port, files] of Object.entries(data.files)) {
    box.append(el("h4", { text: port }), el("ul", { "data-port": port }, ...files.map((f) => el("li", { text: f }))));
  }
}

$("#pipeline-open").addEventListener("click", async () => {
  clearErrors();
  quietly(post("/api/pipelines", { path: $("#pipeline-path").value }, "pipeline").then((p) => refreshPipelines(p.name)));
});
$("#pipeline-select").addEventListener("change", () => { state.pipeline = $("#pipeline-select").value; quietly(loadPipeline()); });
$("#pipeline-run").addEventListener("click", () => {
  clearErrors();
  quietly(post(`/api/pipelines/${state.pipeline}/run`, { force_rerun: $("#force-rerun").checked }, "pipeline").then(loadPipeline));
});

// --- Start -----------------------------------------------------------------------------------------------

async function start() {
  const s = await get("/api/state", "path");
  $("#workspace").textContent = `workspace: ${s.workspace}`;
  $("#roots").textContent = s.roots.join(", ");
  for (const [key, value] of Object.entries(s.defaults)) { const input = $(`#${key}`); if (input && value != null) input.value = value; }
  quietly(browse(null));
  quietly(get("/api/models", "model_name").then((models) => { state.models = models; showModels(); }));
  $("#validation_dataset").append(...s.datasets.map((d) => el("option", { value: d, text: d })));
  if (s.datasets.length) quietly(get(`/api/datasets/${s.datasets[s.datasets.length - 1]}`, "path").then(showDataset));
  await refreshRuns();
  if (state.run) quietly(pollRun());
}
quietly(start());
