// The operator's page: upload images to POST /predict?overlay=png, show each result, and
// re-decide them at another false-alarm rate with GET /thresholds (nothing is rescored).
"use strict";

const $ = (id) => document.getElementById(id);
const cards = []; // {element, score}
let model = null;
let threshold = null; // image threshold in use; null = model not calibrated

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(typeof body.detail === "string" ? body.detail : `${response.status} ${response.statusText}`);
  return body;
}

function renderFacts(facts) {
  const rows = [
    ["method", facts.method], ["backbone", facts.backbone], ["input size", facts.input_size],
    ["training images", facts.training_images], ["calibration images", facts.calibration_images],
    ["fpr", facts.fpr], ["image threshold", facts.image_threshold],
    ["pixel threshold", facts.pixel_threshold], ["file", facts.file], ["sha256", facts.sha256],
  ];
  $("facts").replaceChildren(...rows.map(([key, value]) => {
    const tr = document.createElement("tr");
    for (const text of [key, value ?? "–"]) {
      const td = document.createElement("td");
      td.textContent = String(text);
      tr.append(td);
    }
    return tr;
  }));
}

function decide(card) {
  const decision = card.element.querySelector(".decision");
  if (threshold === null) {
    decision.textContent = "not calibrated";
    decision.className = "decision";
    return;
  }
  const anomalous = card.score > threshold;
  decision.textContent = anomalous ? "anomalous" : "normal";
  decision.className = `decision ${anomalous ? "anomalous" : "normal"}`;
  card.element.classList.toggle("anomalous", anomalous);
  card.element.dataset.decision = decision.textContent;
}

function addCard(result) {
  const element = $("card").content.firstElementChild.cloneNode(true);
  element.querySelector(".name").textContent = result.name;
  element.querySelector(".score").textContent = result.score.toPrecision(6);
  element.querySelector(".normalized").textContent = result.normalized === null ? "–" : result.normalized.toFixed(3);
  element.querySelector(".area").textContent = result.defect_area_fraction === null ? "–" : `${(100 * result.defect_area_fraction).toFixed(2)} %`;
  element.querySelector(".boxes").textContent = result.boxes === null ? "–" : String(result.boxes.length);
  const img = element.querySelector(".overlay");
  img.addEventListener("load", () => {
    for (const [x0, y0, x1, y1] of result.boxes || []) {
      const box = document.createElement("div");
      box.className = "box";
      const w = img.naturalWidth, h = img.naturalHeight;
      Object.assign(box.style, {
        left: `${(100 * x0) / w}%`, top: `${(100 * y0) / h}%`,
        width: `${(100 * (x1 - x0)) / w}%`, height: `${(100 * (y1 - y0)) / h}%`,
      });
      img.parentElement.append(box);
    }
  });
  img.src = `data:image/png;base64,${result.overlay_png}`;
  const card = { element, score: result.score };
  cards.push(card);
  decide(card);
  $("results").prepend(element);
}

async function upload(files) {
  showError("");
  for (const file of files) {
    const form = new FormData();
    form.append("files", file, file.name);
    try {
      const body = await getJSON("/predict?overlay=png", { method: "POST", body: form });
      body.results.forEach(addCard);
    } catch (error) {
      showError(`${file.name}: ${error.message}`);
    }
  }
}

async function setFpr(fpr) {
  $("fpr-value").textContent = fpr.toFixed(3);
  try {
    const t = await getJSON(`/thresholds?fpr=${fpr}`);
    threshold = t.image_threshold;
    $("threshold").textContent = `image threshold ${threshold.toPrecision(6)}; expected false-alarm rate ${t.expected_false_alarm_rate.toFixed(3)} on ${t.calibration_images} calibration images. Boxes stay at the model's pixel threshold.`;
    cards.forEach(decide);
  } catch (error) {
    showError(error.message);
  }
}

async function start() {
  try {
    model = await getJSON("/model");
  } catch (error) {
    $("status").textContent = `model not available: ${error.message}`;
    return;
  }
  $("status").textContent = `${model.method} · ${model.backbone} · ${model.input_size} px`;
  renderFacts(model);
  if (model.calibrated) {
    threshold = model.image_threshold;
    $("fpr-box").hidden = false;
    $("fpr").value = model.fpr;
    $("fpr-value").textContent = Number(model.fpr).toFixed(3);
    $("threshold").textContent = `image threshold ${threshold.toPrecision(6)} (the model's)`;
  }
  let timer = null;
  $("fpr").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => setFpr(Number($("fpr").value)), 80);
  });
  $("fpr-reset").addEventListener("click", () => {
    $("fpr").value = model.fpr;
    setFpr(Number(model.fpr));
  });
  $("files").addEventListener("change", (event) => upload([...event.target.files]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload([...event.dataTransfer.files]);
  });
}

start();
