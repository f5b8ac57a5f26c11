// The page: upload one scan, show the probability against the operating point and the Grad-CAM
// heatmap over the image; for a volume, its slices sorted by score. No external resources.
"use strict";
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("bonetumor-token") || "";
let result = null;

function headers() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModel() {
  const r = await fetch("/api/model", { headers: headers() });
  if (r.status === 401) {
    $("token-box").hidden = false;
    $("model").textContent = "This server needs an access token.";
    return;
  }
  const m = await r.json();
  $("token-box").hidden = true;
  const engine = m.heatmaps_from ? `, ${m.precision}; heatmaps from ${m.heatmaps_from}` : "";
  $("model").textContent = `Model: ${m.name}, classes ${m.classes.join(" / ")}, operating point ${m.threshold.toFixed(3)}${engine}`;
  $("heatmap-warning").hidden = !m.heatmap_warning;
  $("heatmap-warning").textContent = m.heatmap_warning ? `Warning: ${m.heatmap_warning}.` : "";
}

function fmt(p) { return p === undefined || p === null ? "" : Number(p).toFixed(3); }

function showImage(item) {
  $("image").src = "data:image/png;base64," + item.image_png;
  $("original").src = $("image").src;
  $("heatmap").src = "data:image/png;base64," + item.heatmap_png;
  const where = item.slice === null || item.slice === undefined ? "" : `slice ${item.slice}, `;
  const unlike = item.unlike_training ? " (unlike the training data)" : "";
  $("caption").textContent = `${where}P = ${fmt(item.probability)} (${item.label})${unlike}; heatmap: evidence for "${item.explained_class}"`;
}

function showOod(res) {
  // A probability for an image unlike any the model was trained on means nothing: say so first.
  const ood = res.ood || {};
  const warn = $("ood-warning");
  warn.hidden = !(ood.checked && ood.flagged > 0);
  if (warn.hidden) return;
  const what = res.kind === "study" ? `${ood.flagged} of ${ood.of} slices are` : "This image is";
  warn.textContent = `${what} unlike the training data (beyond the ${Math.round(100 * ood.quantile)}th ` +
    "percentile of the validation images' scores): the model was not trained on images like " +
    "this, so its probability cannot be trusted here.";
  $("label").textContent += " (unlike the training data)";
}

function render(res) {
  result = res;
  $("result").hidden = false;
  const positive = res.label === res.positive_class;
  $("label").textContent = res.label;
  $("label").className = "label " + (positive ? "positive" : "negative");
  $("positive").textContent = res.positive_class;
  $("probability").textContent = fmt(res.probability);
  $("threshold").textContent = fmt(res.threshold);
  $("bar").style.width = (100 * (res.probability || 0)) + "%";
  $("mark").style.left = (100 * res.threshold) + "%";
  $("meter").setAttribute("aria-label", `probability ${fmt(res.probability)}, operating point ${fmt(res.threshold)}`);
  $("study-note").textContent = res.kind === "study"
    ? `Study of ${res.study.n_slices} slices; score = ${res.study.aggregate} of the slice scores.` : "";
  showOod(res);
  showImage(res.images[0]);
  const box = $("slices-box");
  box.hidden = res.kind !== "study";
  if (res.kind === "study") {
    const withMap = new Map(res.images.map((im) => [im.slice, im]));
    const rows = [...res.slices].sort((a, b) => (b.probability || 0) - (a.probability || 0));
    const body = $("slices").querySelector("tbody");
    body.innerHTML = "";
    for (const s of rows) {
      const tr = document.createElement("tr");
      for (const v of [s.slice, fmt(s.probability), s.label]) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      }
      const td = document.createElement("td");
      if (withMap.has(s.slice)) {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = "show";
        b.setAttribute("aria-label", `show slice ${s.slice} with its heatmap`);
        b.addEventListener("click", () => showImage(withMap.get(s.slice)));
        td.appendChild(b);
      }
      tr.appendChild(td);
      body.appendChild(tr);
    }
  }
}

async function upload(files) {
  files = [...files];
  if (!files.length) return;
  // Several files at once: the DICOM slices of one series.
  const file = { name: files.length === 1 ? files[0].name : `${files.length} files` };
  setStatus(`Analysing ${file.name}…`, false);
  const form = new FormData();
  for (const f of files) form.append("file", f);
  try {
    const r = await fetch("/api/predict", { method: "POST", body: form, headers: headers() });
    const body = await r.json().catch(() => ({ detail: r.statusText }));
    if (!r.ok) {
      if (r.status === 401) $("token-box").hidden = false;
      setStatus(`${file.name}: ${body.detail}`, true);
      return;
    }
    setStatus(`${file.name}: done.`, false);
    render(body);
  } catch (e) {
    setStatus(`${file.name}: the server did not answer (${e}).`, true);
  }
}

$("file").addEventListener("change", (e) => upload(e.target.files));
const zone = $("dropzone");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  upload(e.dataTransfer.files);
});
$("opacity").addEventListener("input", (e) => {
  $("heatmap").style.opacity = e.target.value / 100;
  $("opacity-value").textContent = e.target.value + "%";
});
$("heatmap").style.opacity = 0.35;  // the anatomy stays readable under the map
$("zoom").addEventListener("input", (e) => {
  $("panes").style.setProperty("--zoom", e.target.value / 100);
  $("zoom-value").textContent = e.target.value + "%";
});
$("token-save").addEventListener("click", () => {
  token = $("token").value.trim();
  sessionStorage.setItem("bonetumor-token", token);
  loadModel();
});
loadModel();
