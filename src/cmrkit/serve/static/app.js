// cmrkit search page: plain JS, no build step. Search returns a stable id list; metadata is
// fetched page by page (/api/items) as the grid scrolls.
"use strict";

const $ = (id) => document.getElementById(id);
const pageParam = Number(new URLSearchParams(location.search).get("page_size"));
const state = {
  ids: [], scores: [], shown: 0, version: "", image: null, busy: false,
  pageSize: pageParam > 0 && pageParam <= 100 ? pageParam : 24,
};

// --- colours: adapters in bank order take a palette colour (new adapters append) -------------
const PALETTE = ["#5b3fd1", "#c2410c", "#0f766e", "#be123c", "#1d4ed8", "#a16207", "#7e22ce",
  "#15803d", "#0e7490", "#9d174d"];
let adapterOrder = [];
function colour(name) {
  const i = adapterOrder.indexOf(name);
  if (i >= 0) return PALETTE[i % PALETTE.length];
  let h = 2166136261;  // unknown name: FNV-1a hue
  for (const c of name) h = Math.imul(h ^ c.charCodeAt(0), 16777619) >>> 0;
  return `hsl(${Math.round(((h % 1000) * 137.508) % 360)} 62% 42%)`;
}
function badge(a) {
  const el = document.createElement("span");
  el.className = "badge";
  el.style.background = colour(a.name);
  el.textContent = a.weight < 0.995 ? `${a.name} ${a.weight.toFixed(2)}` : a.name;
  el.title = `routed to ${a.name} (weight ${a.weight.toFixed(3)})`;
  return el;
}
function badges(adapters) {
  const box = document.createElement("div");
  box.className = "badges";
  if (!adapters || !adapters.length) {
    const bare = document.createElement("span");
    bare.className = "badge bare";
    bare.textContent = "backbone";
    box.append(bare);
  } else adapters.forEach((a) => box.append(badge(a)));
  return box;
}

// --- requests ---------------------------------------------------------------------------------
async function call(url, options = {}) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
  return body;
}
function adminHeaders(json) {
  const h = { Authorization: `Bearer ${$("token").value.trim()}` };
  if (json) h["Content-Type"] = "application/json";
  return h;
}
function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// --- search -----------------------------------------------------------------------------------
async function search(like) {
  const q = $("q").value.trim();
  if (!q && !state.image && !like) return status("Type a query or drop an image.");
  const form = new FormData();
  if (q && !like) form.append("q", q);
  if (like) form.append("like", like);
  if (state.image && !like) form.append("image", state.image);
  form.append("k", "200");
  form.append("page_size", String(state.pageSize));
  if ($("domain").value) form.append("domain", $("domain").value);
  status("Searching…");
  try {
    const r = await call("/api/search", { method: "POST", body: form });
    Object.assign(state, { ids: r.ids, scores: r.scores, shown: 0, version: r.version });
    $("grid").replaceChildren();
    renderRoute(r);
    addCards(r.items);
    const removed = r.filtered_out ? ` · ${r.filtered_out} removed by the filter` : "";
    status(`${r.total} results from index ${r.version}${removed} · ${(r.timings_ms.route + r.timings_ms.encode + r.timings_ms.search).toFixed(1)} ms`);
  } catch (e) {
    status(e.message, true);
  }
}
function renderRoute(r) {
  const box = $("route");
  box.replaceChildren();
  for (const step of r.route) {
    const label = document.createElement("span");
    label.className = "score";
    const sign = step.weight < 0 ? "−" : "";
    label.textContent = `${sign}${Math.abs(step.weight) !== 1 ? Math.abs(step.weight) + "×" : ""}${step.modality} “${step.term}” →`;
    box.append(label, badges(step.adapters));
  }
}
function addCards(items) {
  const grid = $("grid");
  for (const item of items) {
    const i = state.shown++;
    if (item.missing) continue;
    const card = document.createElement("article");
    card.className = "card";
    card.tabIndex = 0;
    card.dataset.id = item.id;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.src = item.thumb;
    img.alt = item.caption || item.id;
    const body = document.createElement("div");
    body.className = "body";
    const cap = document.createElement("div");
    cap.className = "caption";
    cap.textContent = item.caption || item.id;
    const row = document.createElement("div");
    row.className = "row";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = (item.score ?? state.scores[i]).toFixed(3);
    row.append(badges(item.adapters), score);
    body.append(cap, row);
    card.append(img, body);
    card.addEventListener("click", () => openItem(item, state.scores[i]));
    card.addEventListener("keydown", (e) => e.key === "Enter" && openItem(item, state.scores[i]));
    grid.append(card);
  }
  $("more").hidden = state.shown >= state.ids.length;
}
async function more() {
  if (state.busy || state.shown >= state.ids.length) return;
  state.busy = true;
  try {
    const ids = state.ids.slice(state.shown, state.shown + state.pageSize);
    const params = new URLSearchParams();
    ids.forEach((id) => params.append("ids", id));
    const r = await call(`/api/items?${params}`);
    addCards(r.items);
  } catch (e) {
    status(e.message, true);
  } finally {
    state.busy = false;
  }
}

// --- the large view ---------------------------------------------------------------------------
function openItem(item, score) {
  $("v-img").src = item.image;
  $("v-img").alt = item.caption || item.id;
  $("v-title").textContent = item.caption || item.id;
  $("v-badges").replaceChildren(badges(item.adapters));
  const meta = $("v-meta");
  meta.replaceChildren();
  const rows = [["id", item.id], ["domain", item.domain || "—"], ["score", score.toFixed(4)],
    ["file", item.file || "—"], ["captions", (item.captions || []).join(" / ") || "—"]];
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    meta.append(dt, dd);
  }
  $("v-like").onclick = () => { closeItem(); $("q").value = ""; search(item.id); };
  $("viewer").hidden = false;
}
function closeItem() { $("viewer").hidden = true; }

// --- image drop zone --------------------------------------------------------------------------
function setImage(file) {
  state.image = file || null;
  $("drop").classList.toggle("has", !!file);
  $("drop-label").textContent = file ? `✓ ${file.name}` : "+ image";
  if (file) search();
}

// --- admin ------------------------------------------------------------------------------------
async function loadInfo() {
  const info = await call("/api/info");
  adapterOrder = info.adapters;
  const dl = $("info");
  dl.replaceChildren();
  const rows = [["version", info.version], ["items", info.items], ["adapters", info.adapters.join(", ") || "—"],
    ["backbone", info.backbone || "—"], ["last update", info.last_update || "—"]];
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    dl.append(dt, dd);
  }
  const routes = $("routes");
  routes.replaceChildren();
  const entries = [...Object.entries(info.route_counts), ["backbone", info.bare]];
  for (const [name, count] of entries) {
    const line = document.createElement("div");
    line.className = "line";
    line.dataset.adapter = name;
    const label = document.createElement("span"); label.textContent = name;
    const track = document.createElement("div"); track.className = "track";
    const fill = document.createElement("div"); fill.className = "fill";
    fill.style.width = `${info.items ? (100 * count) / info.items : 0}%`;
    fill.style.background = name === "backbone" ? "#98a2b3" : colour(name);
    track.append(fill);
    const n = document.createElement("span"); n.className = "count"; n.textContent = count;
    line.append(label, track, n);
    routes.append(line);
  }
  const select = $("domain");
  const current = select.value;
  select.replaceChildren(new Option("all domains", ""));
  for (const d of Object.keys(info.domains).sort()) if (d) select.append(new Option(d, d));
  select.value = current;
  return info;
}
async function addDomain() {
  const button = $("add-domain");
  button.disabled = true;
  $("job").textContent = "Starting…";
  try {
    let job = await call("/api/admin/domains", {
      method: "POST", headers: adminHeaders(true), body: JSON.stringify({ bank: $("bank").value.trim() }),
    });
    const bar = $("progress");
    bar.hidden = false;
    while (job.state === "running") {
      bar.max = job.total || 1;
      bar.value = job.done;
      $("job").textContent = job.total ? `Re-embedding ${job.done} / ${job.total} items…` : "Re-routing…";
      await new Promise((r) => setTimeout(r, 300));
      job = await call(`/api/admin/jobs/${job.id}`, { headers: adminHeaders() });
    }
    if (job.state === "failed") throw new Error(job.message);
    bar.max = 1; bar.value = 1;
    const res = job.result;
    $("job").textContent = `Done: ${res.reembedded} of ${res.total} items re-embedded in ${res.seconds} s → ${res.version}`;
    await loadInfo();
  } catch (e) {
    $("job").textContent = e.message;
  } finally {
    button.disabled = false;
  }
}

// --- wiring -----------------------------------------------------------------------------------
$("search").addEventListener("submit", (e) => { e.preventDefault(); search(); });
$("file").addEventListener("change", (e) => setImage(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) setImage(e.dataTransfer.files[0]);
});
drop.addEventListener("contextmenu", (e) => { e.preventDefault(); setImage(null); });
$("domain").addEventListener("change", () => state.ids.length && search());
$("more").addEventListener("click", more);
new IntersectionObserver((entries) => entries[0].isIntersecting && state.shown && more())
  .observe($("sentinel"));
$("close").addEventListener("click", closeItem);
$("viewer").addEventListener("click", (e) => e.target === $("viewer") && closeItem());
document.addEventListener("keydown", (e) => e.key === "Escape" && closeItem());
$("admin-toggle").addEventListener("click", () => {
  $("admin").hidden = !$("admin").hidden;
  if (!$("admin").hidden) loadInfo().catch((e) => status(e.message, true));
});
$("admin-close").addEventListener("click", () => { $("admin").hidden = true; });
$("token").value = sessionStorage.getItem("cmrkit-token") || "";
$("token").addEventListener("change", () => sessionStorage.setItem("cmrkit-token", $("token").value));
$("add-domain").addEventListener("click", addDomain);
loadInfo().catch((e) => status(e.message, true));
