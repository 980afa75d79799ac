// The demo page: no build step. Offers the benchmark's test examples (GET /v1/examples), sends a post
// to /v1/ner (and /v1/re when head and tail spans are set), and draws what came back: entities by type,
// every relation's probability with head and tail marked, the noun phrases, their regions on the
// post's image and on the back-translation v', the three divergence scores, whether v' came from the
// cache, the server's time per step, and an example's gold labels beside the prediction.
"use strict";

const $ = (id) => document.getElementById(id);
const SCORES = {
  strengthen: "the image shows what the text says",
  complement: "the image adds what the text leaves open",
  weaken: "the image has little to do with the text",
};
let current = null; // the example being shown, or null for the user's own sentence

// ----------------------------------------------------------------------------- numbers for people

const round2 = (value) => Number(value).toFixed(2);
const ms = (value) => (value < 1 ? "<1 ms" : `${Math.round(value)} ms`);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ----------------------------------------------------------------------------- HTTP

function token() {
  const value = $("token").value.trim();
  if (value) sessionStorage.setItem("tmr-token", value);
  return value || sessionStorage.getItem("tmr-token") || "";
}

function headers() {
  const t = token();
  return t ? { "Content-Type": "application/json", Authorization: `Bearer ${t}` } : { "Content-Type": "application/json" };
}

function problem(status, data) {
  const details = (data.detail || []).map((d) => `${d.field}: ${d.msg}`).join("\n");
  const error = new Error(`${status} ${details || JSON.stringify(data)}`);
  error.status = status;
  error.detail = data.detail || [];
  return error;
}

async function request(path, options) {
  const response = await fetch(path, { headers: headers(), ...options });
  const data = await response.json();
  if (!response.ok) throw problem(response.status, data);
  data.serverTiming = parseServerTiming(response.headers.get("Server-Timing") || "");
  return data;
}

const post = (path, body) => request(path, { method: "POST", body: JSON.stringify(body) });

function parseServerTiming(header) {
  // "image;dur=0.21, phrases;dur=1.30, ..." -> [["image", 0.21], ["phrases", 1.3], ...]
  return header.split(",").map((part) => part.trim().split(";dur=")).filter((p) => p.length === 2)
    .map(([name, value]) => [name, Number(value)]);
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result); // a data: URL, which the API accepts
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ----------------------------------------------------------------------------- examples

let examplesTimer = null;

async function loadExamples() {
  const box = $("examples");
  const note = $("examples-note");
  try {
    const { examples } = await request("/v1/examples", { method: "GET" });
    box.textContent = "";
    for (const example of examples) box.appendChild(exampleButton(example));
    note.textContent = examples.length ? "" : "The benchmark's test split has no examples.";
  } catch (error) {
    box.textContent = "";
    note.textContent = error.status === 401
      ? "Enter the server's token above to load the examples."
      : `No examples: ${(error.detail[0] || {}).msg || error.message}`;
  }
}

function exampleButton(example) {
  const button = el("button", `example ${example.task}`);
  button.type = "button";
  button.dataset.id = example.id;
  button.dataset.task = example.task;
  button.dataset.alignment = example.alignment;
  const image = el("img");
  image.src = example.image;
  image.alt = "";
  button.appendChild(image);
  const label = el("span", "label");
  label.appendChild(el("strong", "", `${example.task.toUpperCase()} · ${example.alignment}`));
  label.appendChild(el("span", "", example.text));
  button.appendChild(label);
  button.addEventListener("click", () => runExample(example, button));
  return button;
}

function runExample(example, button) {
  for (const other of document.querySelectorAll("#examples .example")) other.setAttribute("aria-pressed", "false");
  button.setAttribute("aria-pressed", "true");
  current = example;
  $("text").value = example.text;
  $("image").value = "";
  $("preview").src = example.image;
  const spans = example.task === "re"
    ? [example.gold.head.start, example.gold.head.end, example.gold.tail.start, example.gold.tail.end] : ["", "", "", ""];
  ["head-start", "head-end", "tail-start", "tail-end"].forEach((id, i) => { $(id).value = spans[i]; });
  $("form").requestSubmit();
}

function forgetExample() {
  current = null;
  for (const other of document.querySelectorAll("#examples .example")) other.setAttribute("aria-pressed", "false");
}

// ----------------------------------------------------------------------------- drawing

function drawSpans(target, tokens, spans) {
  // spans: [{start, end, className, label, title}] (not overlapping); the rest are plain tokens
  target.textContent = "";
  const starts = new Map(spans.map((s) => [s.start, s]));
  for (let i = 0; i < tokens.length;) {
    const span = starts.get(i);
    if (span) {
      const mark = el("mark", span.className, tokens.slice(span.start, span.end).join(" "));
      Object.assign(mark.dataset, span.data || {});
      if (span.title) mark.title = span.title;
      mark.appendChild(el("small", "", span.label));
      target.appendChild(mark);
      target.appendChild(document.createTextNode(" "));
      i = span.end;
    } else {
      target.appendChild(document.createTextNode(tokens[i] + " "));
      i += 1;
    }
  }
}

function drawEntities(tokens, entities) {
  drawSpans($("sentence"), tokens, entities.map((e) => ({
    start: e.start, end: e.end, className: `ent ${e.type}`, label: e.type, data: { type: e.type },
    title: `${e.type} (score ${round2(e.score)})`,
  })));
  $("sentence").dataset.entities = String(entities.length);
}

function drawGoldEntities(tokens, predicted) {
  const gold = current && current.task === "ner" ? current.gold.entities : null;
  $("gold").hidden = !gold;
  if (!gold) return;
  drawSpans($("gold-sentence"), tokens, gold.map((e) => ({
    start: e.start, end: e.end, className: `ent ${e.type}`, label: e.type, data: { type: e.type },
  })));
  const key = (e) => `${e.start}:${e.end}:${e.type}`;
  const found = new Set(predicted.map(key));
  const right = gold.filter((e) => found.has(key(e))).length;
  $("gold-score").textContent = `${right} of ${gold.length} gold entities found exactly` +
    (predicted.length > right ? `, ${predicted.length - right} predicted that are not gold` : "");
}

function drawRelation(re) {
  const section = $("relation-section");
  section.hidden = !re;
  if (!re) return;
  drawSpans($("re-sentence"), re.tokens, [
    { start: re.head.start, end: re.head.end, className: "arg head", label: "head" },
    { start: re.tail.start, end: re.tail.end, className: "arg tail", label: "tail" },
  ].sort((a, b) => a.start - b.start));
  $("relation").textContent = `Relation: ${re.relation} (p = ${round2(re.probabilities[re.relation])})`;
  const gold = current && current.task === "re" ? current.gold.relation : null;
  $("gold-relation").hidden = gold === null;
  if (gold !== null) {
    $("gold-relation").textContent = `Gold: ${gold} ${gold === re.relation ? "✓ the prediction is right" : "✗ the prediction is wrong"}`;
    $("gold-relation").className = gold === re.relation ? "right" : "wrong";
  }
  const body = $("probabilities").querySelector("tbody");
  body.textContent = "";
  const labels = Object.entries(re.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [label, p] of labels) {
    const row = el("tr");
    row.dataset.relation = label;
    if (label === re.relation) row.classList.add("predicted");
    if (label === gold) row.classList.add("gold");
    row.appendChild(el("td", "", label + (label === gold ? " (gold)" : "")));
    row.appendChild(el("td", "num", round2(p)));
    const bar = el("span", "bar");
    bar.style.width = `${Math.round(p * 200)}px`;
    row.appendChild(el("td")).appendChild(bar);
    body.appendChild(row);
  }
}

function drawPhrases(phrases) {
  const list = $("phrases");
  list.textContent = "";
  phrases.forEach((phrase, i) => list.appendChild(el("li", `phrase c${i % 6}`, phrase)));
  if (!phrases.length) list.appendChild(el("li", "hint", "none found"));
}

async function drawBoxes(frameId, image, regions, phrases, gold) {
  const frame = $(frameId);
  for (const old of frame.querySelectorAll(".box")) old.remove();
  if (!image.getAttribute("src")) return;
  try {
    await image.decode();
  } catch (error) {
    return; // not an image the browser can show: no boxes to place
  }
  const width = image.naturalWidth;
  const height = image.naturalHeight;
  const place = (box, className, text, data) => {
    const [x1, y1, x2, y2] = box;
    const div = el("div", className);
    Object.assign(div.style, {
      left: `${(100 * x1) / width}%`, top: `${(100 * y1) / height}%`,
      width: `${(100 * Math.max(x2 - x1, 0)) / width}%`, height: `${(100 * Math.max(y2 - y1, 0)) / height}%`,
    });
    Object.assign(div.dataset, data);
    div.appendChild(el("span", "", text));
    frame.appendChild(div);
  };
  for (const item of gold || []) {
    if (item.box) place(item.box, "box gold", `gold: ${item.text}`, { gold: item.text });
  }
  for (const region of regions) {
    const colour = Math.max(phrases.indexOf(region.phrase), 0) % 6;
    place(region.box, `box region c${colour}`, `${region.phrase} ${round2(region.score)}`, { phrase: region.phrase });
  }
}

function goldBoxes() {
  if (!current) return null;
  return current.task === "ner" ? current.gold.entities : [current.gold.head, current.gold.tail];
}

function drawDivergence(divergence) {
  const body = $("divergence").querySelector("tbody");
  body.textContent = "";
  if (!divergence) {
    body.innerHTML = "<tr><td>no image: no divergence scores (the model used α = (0, 0, 1))</td></tr>";
    return;
  }
  const top = Object.keys(SCORES).reduce((a, b) => (divergence[a] >= divergence[b] ? a : b));
  for (const name of Object.keys(SCORES)) {
    const row = el("tr");
    row.dataset.score = name;
    if (name === top) row.classList.add("predicted");
    row.appendChild(el("td", "", name));
    row.appendChild(el("td", "num", round2(divergence[name])));
    const bar = el("span", "bar");
    bar.style.width = `${Math.round(divergence[name] * 200)}px`;
    row.appendChild(el("td")).appendChild(bar);
    row.appendChild(el("td", "hint", SCORES[name]));
    body.appendChild(row);
  }
  const gold = $("gold-alignment");
  gold.hidden = !current;
  if (current) {
    gold.textContent = `Gold alignment of this example: ${current.alignment}` +
      (current.alignment === "weaken" ? " (its image comes from another post, so it shows none of the gold entities)" : "");
  }
}

async function drawGenerated(info, phrases) {
  const image = $("generated");
  const note = $("generated-note");
  image.removeAttribute("src");
  if (!info.used) {
    note.textContent = info.error ? `generation failed: ${info.error}` : "none cached (fast mode): the model ran without it";
    await drawBoxes("generated-frame", image, [], phrases);
    return;
  }
  note.textContent = info.cached ? "from the cache (made earlier for this text)" : "generated for this request";
  note.dataset.source = info.cached ? "cache" : "generated";
  const response = await fetch(info.url, { headers: headers() });
  if (response.ok) image.src = URL.createObjectURL(await response.blob());
  await drawBoxes("generated-frame", image, info.regions || [], phrases);
}

function drawTiming(route, timing) {
  const steps = timing.filter(([name]) => name !== "model").map(([name, value]) => `${name.replace("_", "-")} ${ms(value)}`);
  const total = timing.find(([name]) => name === "model");
  $("timing").textContent = `Server time (${route}): ${steps.join(" · ")}` + (total ? `; the whole model call ${ms(total[1])}` : "");
}

// ----------------------------------------------------------------------------- the form

function spanValue(id) {
  const value = $(id).value;
  return value === "" ? null : Number(value);
}

async function analyse(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("status").textContent = "working…";
  $("submit").disabled = true;
  try {
    const body = { text: $("text").value };
    const file = $("image").files[0];
    if (file) body.image = await readImage(file);
    else if (current) body.image = current.image;
    if (current) body.sample_id = current.id;
    if ($("mode").value) body.mode = $("mode").value;
    const ner = await post("/v1/ner", body);
    drawEntities(ner.tokens, ner.entities);
    drawGoldEntities(ner.tokens, ner.entities);
    const spans = ["head-start", "head-end", "tail-start", "tail-end"].map(spanValue);
    let re = null;
    if (spans.every((v) => v !== null)) {
      re = await post("/v1/re", { ...body, head: { start: spans[0], end: spans[1] }, tail: { start: spans[2], end: spans[3] } });
    }
    drawRelation(re);
    // the relation model's own steps when it ran (its phrases, regions and α), else the NER model's
    const shown = re || ner;
    const route = re ? "/v1/re" : "/v1/ner";
    $("computed-by").textContent = `From the ${route} response (${shown.mode} mode).`;
    drawPhrases(shown.phrases);
    drawDivergence(shown.divergence);
    $("gold-boxes-note").textContent = current && goldBoxes().some((g) => g && g.box) ? " (dashed: the gold entities' shapes)" : "";
    await drawBoxes("preview-frame", $("preview"), shown.regions || [], shown.phrases, goldBoxes());
    await drawGenerated(shown.back_translation, shown.phrases);
    drawTiming(route, shown.serverTiming);
    $("status").textContent = `done (${ner.mode} mode, ${ner.entities.length} entities)`;
  } catch (error) {
    $("error").textContent = String(error.message || error);
    $("error").hidden = false;
    $("status").textContent = "error";
  } finally {
    $("submit").disabled = false;
  }
}

$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (file) {
    forgetExample();
    $("preview").src = URL.createObjectURL(file);
  }
});
$("text").addEventListener("input", () => {
  if (!current) return;
  forgetExample();
  if (!$("image").files[0]) $("preview").removeAttribute("src");
});
$("token").addEventListener("input", () => {
  clearTimeout(examplesTimer);
  examplesTimer = setTimeout(loadExamples, 300);
});
$("form").addEventListener("submit", analyse);
loadExamples();
