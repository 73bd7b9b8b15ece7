// The operator's page: upload images to POST /predict?overlay=png, show each result, and
// re-decide them at another false-alarm rate with GET /thresholds (nothing is rescored).
// Serving a folder of models, a chooser picks the model (routes under /models/NAME/). Each
// result can be marked "false alarm" or "confirmed defect" (POST .../feedback), and the
// model's rolling anomaly rate and drift alarm (GET /models/NAME) are shown.
"use strict";

const $ = (id) => document.getElementById(id);
const cards = []; // {element, score}
let model = null;
let threshold = null; // image threshold in use; null = model not calibrated
let single = null; // the model's name when one model is served; null for a folder of models
let current = null; // the chosen model's name

const route = (path) => (single !== null ? path : `/models/${encodeURIComponent(current)}${path}`);

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
    // facts not read yet (a model loaded by this image): the server's decision
    decision.textContent = card.decision ?? "not calibrated";
    decision.className = `decision ${card.decision ?? ""}`;
    card.element.dataset.decision = decision.textContent;
    return;
  }
  const anomalous = card.score > threshold;
  decision.textContent = anomalous ? "anomalous" : "normal";
  decision.className = `decision ${anomalous ? "anomalous" : "normal"}`;
  card.element.classList.toggle("anomalous", anomalous);
  card.element.dataset.decision = decision.textContent;
}

async function sendFeedback(element, file, label) {
  const state = element.querySelector(".feedback-state");
  const form = new FormData();
  form.append("files", file, file.name);
  form.append("label", label);
  form.append("note", element.querySelector(".note").value);
  state.textContent = "storing…";
  try {
    const body = await getJSON(route("/feedback"), { method: "POST", body: form });
    state.textContent = `stored (${label === "good" ? "false alarm" : "confirmed defect"}) as ${body.stored}`;
  } catch (error) {
    state.textContent = `not stored: ${error.message}`;
  }
}

function addCard(result, file) {
  const element = $("card").content.firstElementChild.cloneNode(true);
  element.querySelector(".false-alarm").addEventListener("click", () => sendFeedback(element, file, "good"));
  element.querySelector(".confirmed").addEventListener("click", () => sendFeedback(element, file, "defect"));
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
  const card = { element, score: result.score, decision: result.decision };
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
      const body = await getJSON(route("/predict") + "?overlay=png", { method: "POST", body: form });
      body.results.forEach((result) => addCard(result, file));
    } catch (error) {
      showError(`${file.name}: ${error.message}`);
    }
  }
  await showLine();
}

async function showLine() {
  // the rolling anomaly rate and the drift alarm of the chosen model
  let described;
  try {
    described = await getJSON(`/models/${encodeURIComponent(current)}`);
  } catch (error) {
    return;
  }
  const drift = described.drift;
  if (!drift || !drift.calibrated) {
    $("line-box").hidden = true;
    return;
  }
  $("line-box").hidden = false;
  const pct = (x) => (x === null ? "–" : `${(100 * x).toFixed(1)} %`);
  $("rate").textContent = `rolling anomaly rate ${pct(drift.anomaly_rate)} of the last ${drift.answers} answers (window ${drift.window}); calibrated false-alarm rate ${pct(drift.false_alarm_rate)}`;
  let text = drift.ks_pvalue === null
    ? `drift test waiting: ${drift.good} of ${drift.min_good} parts judged good`
    : `drift: ${drift.drift ? "ALARM" : "none"} (KS p-value ${drift.ks_pvalue.toPrecision(2)}, alarm below ${drift.alpha})`;
  if (drift.defect_rate_pvalue !== null) {
    text += `; anomaly rate vs ${pct(drift.expected_defect_rate)} defects: ${drift.defect_rate_alarm ? "ALARM" : "ok"}`;
  }
  $("drift").textContent = text;
  $("drift").classList.toggle("alarm", Boolean(drift.drift || drift.defect_rate_alarm));
}

async function setFpr(fpr) {
  $("fpr-value").textContent = fpr.toFixed(3);
  try {
    const t = await getJSON(route(`/thresholds?fpr=${fpr}`));
    threshold = t.image_threshold;
    $("threshold").textContent = `image threshold ${threshold.toPrecision(6)}; expected false-alarm rate ${t.expected_false_alarm_rate.toFixed(3)} on ${t.calibration_images} calibration images. Boxes stay at the model's pixel threshold.`;
    cards.forEach(decide);
  } catch (error) {
    showError(error.message);
  }
}

async function chooseModel(clear = true) {
  // show the chosen model's facts; clear = a new choice (its results are cleared)
  if (clear) {
    cards.length = 0;
    $("results").replaceChildren();
    $("fpr-box").hidden = true;
    threshold = null;
  }
  try {
    if (single !== null) {
      model = await getJSON("/model");
    } else {
      model = (await getJSON(`/models/${encodeURIComponent(current)}`)).facts;
    }
  } catch (error) {
    $("status").textContent = `model not available: ${error.message}`;
    return;
  }
  const name = single === null ? `${current} · ` : "";
  if (model === null) {
    $("status").textContent = `${name}loads with the first image`;
    $("facts").replaceChildren();
    return;
  }
  $("status").textContent = `${name}${model.method} · ${model.backbone} · ${model.input_size} px`;
  renderFacts(model);
  if (model.calibrated) {
    threshold = model.image_threshold;
    $("fpr-box").hidden = false;
    $("fpr").value = model.fpr;
    $("fpr-value").textContent = Number(model.fpr).toFixed(3);
    $("threshold").textContent = `image threshold ${threshold.toPrecision(6)} (the model's)`;
    cards.forEach(decide);
  }
  await showLine();
}

async function start() {
  try {
    const listed = await getJSON("/models");
    single = listed.single;
    current = single ?? (listed.models[0] || {}).name ?? null;
    if (single === null) {
      $("model-choice").replaceChildren(...listed.models.map((m) => {
        const option = document.createElement("option");
        option.value = m.name;
        option.textContent = m.error ? `${m.name} (error)` : m.name;
        return option;
      }));
      $("model-box").hidden = false;
      $("model-choice").addEventListener("change", () => {
        current = $("model-choice").value;
        chooseModel();
      });
    }
  } catch (error) {
    $("status").textContent = `model not available: ${error.message}`;
    return;
  }
  await chooseModel();
  let timer = null;
  $("fpr").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => setFpr(Number($("fpr").value)), 80);
  });
  $("fpr-reset").addEventListener("click", () => {
    $("fpr").value = model.fpr;
    setFpr(Number(model.fpr));
  });
  $("files").addEventListener("change", async (event) => {
    await upload([...event.target.files]);
    if (model === null) await chooseModel(false);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload([...event.dataTransfer.files]);
  });
  setInterval(showLine, 5000);
}

start();
