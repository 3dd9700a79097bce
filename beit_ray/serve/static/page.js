// The page at / of the Serve app: send one image to /classify or /segment, draw the answer.
// Plain JS, no dependencies: the page must work offline and behind the app's own origin.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tasks: [], task: null, file: null, photoUrl: null, mask: null, photo: null };

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// The API's own words for a 4xx/5xx: {"error": {"code", "message"}}.
function apiMessage(body, resp) {
  if (body && body.error && body.error.message) {
    return `${body.error.message} (HTTP ${resp.status}, ${body.error.code})`;
  }
  return `HTTP ${resp.status} ${resp.statusText}`;
}

async function init() {
  let labels;
  try {
    const resp = await fetch("labels");
    labels = await resp.json();
    if (!resp.ok) throw new Error(apiMessage(labels, resp));
  } catch (e) {
    $("models").textContent = "";
    showError(`cannot ask the API which models run: ${e.message}`);
    return;
  }
  state.tasks = ["classify", "segment"].filter((t) => t in labels);
  const counts = state.tasks.map((t) => `${t} (${Object.keys(labels[t]).length} classes)`);
  $("models").textContent = counts.length ? `serving ${counts.join(" and ")}` : "no model runs";
  state.task = state.tasks[0] || null;
  $("tasks").hidden = state.tasks.length < 2; // a switch only when both deployments run
  for (const input of document.querySelectorAll('input[name="task"]')) {
    input.checked = input.value === state.task;
    input.addEventListener("change", () => {
      state.task = input.value;
      if (state.file) send(state.file);
    });
  }
}

async function send(file) {
  clearError();
  state.file = file;
  if (!state.task) {
    showError("no model is deployed");
    return;
  }
  const url = state.task === "classify" ? "classify?top_k=5" : "segment?with_mask=true";
  const form = new FormData();
  form.append("image", file, file.name || "image");
  $("status").textContent = `sending ${file.name} (${Math.round(file.size / 1024)} KB) to /${state.task}…`;
  const t0 = performance.now();
  let resp, body;
  try {
    resp = await fetch(url, { method: "POST", body: form });
    body = await resp.json().catch(() => null);
  } catch (e) {
    $("status").textContent = "";
    showError(`the request failed: ${e.message}`);
    return;
  }
  const ms = Math.round(performance.now() - t0);
  if (!resp.ok) {
    $("status").textContent = "";
    $("result").hidden = true;
    showError(apiMessage(body, resp));
    return;
  }
  $("status").textContent = `${file.name}: answered by /${state.task} in ${ms} ms`;
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(file);
  if (state.task === "classify") showClasses(body);
  else await showMask(body);
  $("result").hidden = false;
}

function barRow(items) {
  const li = document.createElement("li");
  for (const [cls, content] of items) {
    const span = document.createElement("span");
    span.className = cls;
    if (content instanceof Node) span.appendChild(content);
    else span.textContent = content;
    li.appendChild(span);
  }
  return li;
}

function bar(fraction, color) {
  const fill = document.createElement("span");
  fill.style.width = `${(100 * Math.max(0, Math.min(1, fraction))).toFixed(1)}%`;
  if (color) fill.style.background = color;
  return fill;
}

function showClasses(body) {
  $("overlay").hidden = $("opacity-row").hidden = $("legend").hidden = true;
  $("photo").src = state.photoUrl;
  $("photo").hidden = false;
  $("result-title").textContent = `top ${body.predictions.length} classes`;
  const list = $("top");
  list.replaceChildren(
    ...body.predictions.map((p, i) =>
      barRow([
        ["rank", `${i + 1}`],
        ["label", p.label],
        ["bar", bar(p.score)],
        ["score", `${(100 * p.score).toFixed(1)}%`],
      ]),
    ),
  );
  list.hidden = false;
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`cannot draw ${src.slice(0, 30)}`));
    img.src = src;
  });
}

// The mask PNG is a palette image at the photo's size: drawn over the photo, each class shows
// in its palette colour, the same colour the legend's swatch (classes[i].color) has.
async function showMask(body) {
  $("photo").hidden = $("top").hidden = true;
  state.mask = await loadImage(`data:image/png;base64,${body.mask_png}`);
  state.photo = await loadImage(state.photoUrl).catch(() => null); // a format the browser lacks
  const canvas = $("overlay");
  canvas.width = body.width;
  canvas.height = body.height;
  drawOverlay();
  canvas.hidden = $("opacity-row").hidden = false;
  const classes = [...body.classes].sort((a, b) => b.fraction - a.fraction);
  $("result-title").textContent = `${classes.length} classes, share of the pixels`;
  $("legend").replaceChildren(
    ...classes.map((c) => {
      const li = barRow([
        ["swatch", ""],
        ["label", c.label],
        ["bar", bar(c.fraction, c.color)],
        ["score", `${(100 * c.fraction).toFixed(1)}%`],
      ]);
      li.firstChild.style.background = c.color;
      li.dataset.classId = c.id;
      return li;
    }),
  );
  $("legend").hidden = false;
}

function drawOverlay() {
  const canvas = $("overlay");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
  if (state.photo) ctx.drawImage(state.photo, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = state.photo ? Number($("opacity").value) : 1;
  ctx.imageSmoothingEnabled = false; // class edges stay crisp
  ctx.drawImage(state.mask, 0, 0, canvas.width, canvas.height);
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    if (e.target.files.length) send(e.target.files[0]);
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
  });
  $("opacity").addEventListener("input", () => state.mask && drawOverlay());
}

wire();
init();
