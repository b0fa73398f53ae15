// Model cards on mmfusion's page: what each served model is, how it was trained and what it measured (GET /models),
// with its training curve (GET /models/{role}/curve.png). app.js passes the helpers that talk to the service.

const METRIC_NAMES = {
  "i2t_R@1": "image→text R@1", "i2t_R@10": "image→text R@10", "t2i_R@1": "text→image R@1",
  "t2i_R@10": "text→image R@10", "semantic_P@1": "semantic P@1", top1_seen: "top-1, classes seen in training",
  top5_seen: "top-5, classes seen in training", top1_heldout: "top-1, classes held out of training",
  top5_heldout: "top-5, classes held out of training",
  attribute_accuracy: "attribute accuracy", CIDEr: "CIDEr", "BLEU-4": "BLEU-4", accuracy: "VQA accuracy",
};

function metricRows(m) {
  // one row per figure of a report: ["image→text R@10", "0.912"]
  const rows = [];
  for (const [k, v] of Object.entries(m)) {
    if (k === "task" || k === "n" || typeof v !== "number") continue;
    const name = METRIC_NAMES[k] || k.replace(/^accuracy_/, "VQA accuracy, ");
    rows.push([name, Number.isInteger(v) && Math.abs(v) >= 1 ? String(v) : v.toFixed(3)]);
  }
  return rows;
}

function modelCard(c, loadImage) {
  const li = document.createElement("li");
  li.className = "model-card";
  li.dataset.role = c.role;
  const h = document.createElement("h3");
  h.textContent = `${c.role}: ${c.id || c.name}`;
  const what = Object.assign(document.createElement("p"), { className: "what", textContent: c.what || "" });
  li.append(h, what);
  const facts = [];
  if (c.parameters) facts.push(`${(c.parameters / 1e6).toFixed(2)} M parameters`);
  if (c.trained_on) facts.push(`trained on ${c.trained_on}`);
  const t = c.training;
  if (t && t.step) facts.push(`${t.step.toLocaleString()} steps in ${Math.round(t.elapsed_s || 0)} s`);
  if (c.quantize) facts.push(c.quantize);
  if (facts.length) li.append(Object.assign(document.createElement("p"), { className: "facts", textContent: facts.join(" · ") }));
  const reports = (c.metrics || []).filter((m) => metricRows(m).length);
  if (reports.length) {
    const table = document.createElement("table");
    table.className = "metrics";
    table.createCaption().textContent = "Measured on held-out data";
    for (const m of reports) {
      const body = table.createTBody();
      const th = document.createElement("th");
      th.colSpan = 2;
      th.scope = "rowgroup";
      th.textContent = m.n ? `${m.task} (n=${m.n})` : m.task;
      body.insertRow().append(th);
      for (const [name, value] of metricRows(m)) {
        const tr = body.insertRow();
        tr.insertCell().textContent = name;
        const td = tr.insertCell();
        td.textContent = value;
        td.className = "num";
      }
    }
    li.append(table);
  } else if (!["pretrained", "missing", "other"].includes(c.family)) {
    li.append(Object.assign(document.createElement("p"), { className: "hint", textContent: "Not evaluated yet (mmfusion eval)." }));
  }
  if (c.curve) {
    const img = document.createElement("img");
    img.className = "curve";
    img.alt = `Training curve of the ${c.role}`;
    img.loading = "lazy";
    loadImage(img, `/models/${c.role}/curve.png`);
    li.append(img);
  }
  return li;
}

export async function loadCards({ api, loadImage, list, section }) {
  // ui: the page's api() and loadImage() (they send the API key), the card list and its section
  let cards;
  try {
    cards = (await (await api("models")).json()).models || [];
  } catch {
    return; // an older service without cards: the page works without them
  }
  list.replaceChildren(...cards.map((c) => modelCard(c, loadImage)));
  section.hidden = cards.length === 0;
}
