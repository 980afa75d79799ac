// The demo page: no build step. Sends the form to /v1/ner (and /v1/re when both spans are set)
// and draws the entities by type, the relation, the images and the three divergence scores.
"use strict";

const $ = (id) => document.getElementById(id);

function token() {
  const value = $("token").value.trim();
  if (value) sessionStorage.setItem("tmr-token", value);
  return value || sessionStorage.getItem("tmr-token") || "";
}

function headers() {
  const t = token();
  return t ? { "Content-Type": "application/json", Authorization: `Bearer ${t}` } : { "Content-Type": "application/json" };
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result); // a data: URL, which the API accepts
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function post(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await response.json();
  if (!response.ok) {
    const details = (data.detail || []).map((d) => `${d.field}: ${d.msg}`).join("\n");
    throw new Error(`${response.status} ${details || JSON.stringify(data)}`);
  }
  return data;
}

function drawEntities(tokens, entities) {
  const sentence = $("sentence");
  sentence.textContent = "";
  const starts = new Map(entities.map((e) => [e.start, e]));
  for (let i = 0; i < tokens.length; ) {
    const entity = starts.get(i);
    if (entity) {
      const span = document.createElement("mark");
      span.className = `ent ${entity.type}`;
      span.dataset.type = entity.type;
      span.title = `${entity.type} (score ${entity.score.toFixed(2)})`;
      span.textContent = tokens.slice(entity.start, entity.end).join(" ");
      const label = document.createElement("small");
      label.textContent = entity.type;
      span.appendChild(label);
      sentence.appendChild(span);
      sentence.appendChild(document.createTextNode(" "));
      i = entity.end;
    } else {
      sentence.appendChild(document.createTextNode(tokens[i] + " "));
      i += 1;
    }
  }
  sentence.dataset.entities = String(entities.length);
}

function drawDivergence(divergence) {
  const body = $("divergence").querySelector("tbody");
  body.textContent = "";
  if (!divergence) {
    body.innerHTML = "<tr><td>no image: no divergence scores</td></tr>";
    return;
  }
  for (const name of ["strengthen", "complement", "weaken"]) {
    const row = document.createElement("tr");
    row.dataset.score = name;
    const value = divergence[name];
    row.innerHTML = `<td>${name}</td><td>${value.toFixed(3)}</td>` +
      `<td><span class="bar" style="width:${Math.round(value * 200)}px"></span></td>`;
    body.appendChild(row);
  }
}

async function drawGenerated(info) {
  const image = $("generated");
  const note = $("generated-note");
  image.removeAttribute("src");
  if (!info.used) {
    note.textContent = info.error ? `generation failed: ${info.error}` : "none cached (fast mode): the model ran without it";
    return;
  }
  note.textContent = info.cached ? "from the cache" : "generated for this request";
  const response = await fetch(info.url, { headers: headers() });
  if (response.ok) image.src = URL.createObjectURL(await response.blob());
}

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
    if ($("mode").value) body.mode = $("mode").value;
    const ner = await post("/v1/ner", body);
    drawEntities(ner.tokens, ner.entities);
    drawDivergence(ner.divergence);
    await drawGenerated(ner.back_translation);
    const spans = ["head-start", "head-end", "tail-start", "tail-end"].map(spanValue);
    $("relation").textContent = "";
    if (spans.every((v) => v !== null)) {
      const re = await post("/v1/re", { ...body, head: { start: spans[0], end: spans[1] }, tail: { start: spans[2], end: spans[3] } });
      const p = re.probabilities[re.relation];
      $("relation").textContent = `Relation: ${re.relation} (p = ${p.toFixed(2)})`;
    }
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
  if (file) $("preview").src = URL.createObjectURL(file);
});
$("form").addEventListener("submit", analyse);
