// attribute-ray web UI: the wiring. Runs prompts (streamed progress, cancel), loads a graph with ONE request
// (GET /v1/graphs/{id}, msgpack), prunes it in the browser, and keeps the view's state in the URL.
// Native ES modules, no build step; msgpack comes from the vendored classic script (window.MessagePack).
//
// Test hook: window.__explorer = {
//   ready: bool                      true once a graph is drawn (false while one loads),
//   settled(): bool                  no dashboard fetch for labels pending (labels re-render when they arrive),
//   geometry(): {nodes: [{id, type, x, y, r}], edges: number of edges drawn, tokenLabels: [{text, special, box}],
//                logitLabels: [{id, text, box}]}   in page CSS pixels (boxes as getBoundingClientRect),
//   select(id): bool, pin(id), nodes(): [{id, type, layer, pos}] of drawn nodes, selectedEdges(): edges in+out
//   of the selected node, stats: {nodes, edges} of the pruned graph, timings: {decode, prune, layout} in ms }
import * as api from "./api.js";
import { $, download, el } from "./dom.js";
import { dashboard, dashboardLabel, labelsSettled, nodeLabel, nodeWhere, wantLabels } from "./features.js";
import { FEATURE, TYPE_NAMES, decodeGraph, incoming, outgoing, promptText, pruneGraph } from "./graph-model.js";
import { GraphView } from "./graph-view.js";
import { clearResult, renderTargets, setupInterventions } from "./interventions.js";
import { INFLUENCE_HELP, renderDashboard, renderNoDashboard, renderNodePanel, renderPromptLine } from "./panel.js";
import { cancelJob, formDefaults, hideFinishedProgress, runPrompt } from "./run.js";
import { readUrl, writeUrl } from "./state.js";
import { renderSubgraph, subgraphSvgBlob } from "./subgraph.js";

const S = {
  graphId: null, bytes: null, g: null, p: null,
  nodeThreshold: 0.8, edgeThreshold: 0.98,
  selected: null,          // node index
  pins: [],                // node indices, in pin order (not in a supernode)
  supernodes: [],          // [{label, members: [node index]}]
  view: "graph", showErrors: true, allEdges: false,
  loadSeq: 0, dashSeq: 0,
};
const timings = { decode: 0, prune: 0, layout: 0 };
const view = new GraphView($("#graph-wrap"), {
  onSelect: (i) => select(i),
  onHover: (i) => hover(i),
  label: (i) => nodeLabel(S.g, i),
  where: (i) => nodeWhere(S.g, i),
});

// ---------------------------------------------------------------- errors and progress
function showError(msg) {
  $("#error").textContent = msg || "";
  $("#error").hidden = !msg;
}
const safe = (fn) => (...args) => Promise.resolve().then(() => fn(...args)).catch((e) => showError(e.message || String(e)));

// ---------------------------------------------------------------- model info, recent graphs
const SPECIAL_TEXT = /<\|[^|<>]*\|>|<\/?s>|<(bos|eos|pad)>/gi; // chat markers, BOS/EOS in decoded prompts
const displayName = (s) => (typeof s === "string" && /^([/~]|[A-Za-z]:\\)/.test(s) ? s.split(/[/\\]/).filter(Boolean).pop() : s);

async function loadModels() {
  const m = await api.models();
  $("#model-info").textContent = `${displayName(m.model)} · ${displayName(m.transcoder)} · ${m.n_layers} layers`;
  const d = m.defaults || {};
  const set = (id, v) => { if (v !== null && v !== undefined) $(id).value = v; };
  formDefaults(d);
  const u = readUrl();
  if (u.nodeThreshold === null && d.node_threshold !== undefined) setThresholdInputs(d.node_threshold, S.edgeThreshold);
  if (u.edgeThreshold === null && d.edge_threshold !== undefined) setThresholdInputs(S.nodeThreshold, d.edge_threshold);
}

async function loadRecent() {
  const graphs = await api.recentGraphs();
  $("#recent").replaceChildren(el("option", { value: "" }, `recent graphs (${graphs.length})…`),
    ...graphs.map((r) => {
      const text = r.prompt.replace(SPECIAL_TEXT, "").trim();
      return el("option", { value: r.graph_id, title: r.prompt }, text.length > 60 ? `${text.slice(0, 59)}…` : text);
    }));
}

// ---------------------------------------------------------------- running a prompt, loading and pruning a graph
async function run() {
  showError("");
  const graphId = await runPrompt();
  if (graphId) {
    await openGraph(graphId, null);
    loadRecent().catch(() => {});
  }
}

/** Fetch (one msgpack request), decode, prune and draw graph `id`; `restore` is readUrl()'s state or null. */
async function openGraph(id, restore) {
  const seq = ++S.loadSeq;
  window.__explorer.ready = false;
  showError("");
  $("#prompt-tokens").textContent = "loading graph…";
  const bytes = await api.graphBytes(id);
  if (seq !== S.loadSeq) return; // a newer openGraph won
  let t0 = performance.now();
  const g = decodeGraph(bytes);
  timings.decode = performance.now() - t0;
  Object.assign(S, { graphId: id, bytes, g, selected: null, pins: [], supernodes: [] });
  if (restore?.nodeThreshold !== null && restore?.nodeThreshold !== undefined) setThresholdInputs(restore.nodeThreshold, S.edgeThreshold);
  if (restore?.edgeThreshold !== null && restore?.edgeThreshold !== undefined) setThresholdInputs(S.nodeThreshold, restore.edgeThreshold);
  S.view = restore?.view ?? "graph"; // a fresh graph opens on the graph view, with the current toggles
  if (restore) {
    S.showErrors = restore.showErrors; S.allEdges = restore.allEdges;
    $("#show-errors").checked = S.showErrors; $("#all-edges").checked = S.allEdges;
  }
  const idx = (nodeId) => g.index.get(nodeId);
  S.pins = (restore?.pins || []).map(idx).filter((i) => i !== undefined);
  S.supernodes = (restore?.supernodes || []).map((s) => ({ label: s.label, members: s.ids.map(idx).filter((i) => i !== undefined) }))
    .filter((s) => s.members.length);
  $("#prompt").value = promptText(g);
  clearResult();
  renderPromptLine(g);
  t0 = performance.now();
  prune();
  // default selection: the top logit, so the default view shows what drives the model's answer
  const sel = restore?.selected ? idx(restore.selected) : undefined;
  S.selected = sel !== undefined ? sel : g.K ? g.logitOffset : null;
  for (const b of ["#download-json", "#download-msgpack", "#download-png", "#download-svg"]) $(b).disabled = false;
  $("#recent").value = [...$("#recent").options].some((o) => o.value === id) ? id : "";
  afterChange();
  setView(S.view);
  hideFinishedProgress();
  wantLabels(g, [...view.lay.nodes].sort((a, b) => S.p.cumulative[a] - S.p.cumulative[b]).slice(0, 100), refreshLabels, true);
  window.__explorer.ready = true;
}

function prune() {
  const t0 = performance.now();
  S.p = pruneGraph(S.g, S.nodeThreshold, S.edgeThreshold);
  timings.prune = performance.now() - t0;
  let n = 0;
  for (const s of S.p.shown) n += s;
  window.__explorer.stats = { nodes: n, edges: S.p.E };
  $("#counts").textContent = `${n} nodes · ${S.p.E} edges`;
  const t1 = performance.now();
  view.set(S.g, S.p, { showErrors: S.showErrors, allEdges: S.allEdges });
  timings.layout = performance.now() - t1;
}

function setThresholdInputs(nt, et) {
  S.nodeThreshold = nt; S.edgeThreshold = et;
  $("#node-threshold").value = String(nt); $("#node-threshold-value").textContent = nt.toFixed(2);
  $("#edge-threshold").value = String(et); $("#edge-threshold-value").textContent = et.toFixed(3);
}

let pruneTimer = 0;
function onThresholds() {
  setThresholdInputs(parseFloat($("#node-threshold").value), parseFloat($("#edge-threshold").value));
  if (!S.g) return;
  clearTimeout(pruneTimer);
  pruneTimer = setTimeout(() => { prune(); afterChange(); }, 60); // slider drags prune once they pause
}

// ---------------------------------------------------------------- selection, hover, dashboards
function select(i) {
  S.selected = i ?? null;
  afterChange();
  return S.selected !== null;
}

function hover(i) {
  if (i !== null && S.g.type[i] === FEATURE && !S.g.featLabel[i]) {
    dashboard(S.g.featLayer[i], S.g.featIndex[i]).then(() => view.updateTip(), () => {});
  }
}

async function showDashboard(i) {
  const box = $("#dashboard"), g = S.g, mine = ++S.dashSeq;
  if (i === null || g.type[i] !== FEATURE) { renderNoDashboard(box, g, i); return; }
  box.replaceChildren(el("p", { class: "muted" }, "loading dashboard…"));
  const d = await dashboard(g.featLayer[i], g.featIndex[i]).catch((e) => ({ error: e.message }));
  if (mine !== S.dashSeq) return;
  if (!d || d.error) { box.replaceChildren(el("p", { class: "muted" }, d ? `dashboard error: ${d.error}` : "This feature has no dashboard.")); return; }
  renderDashboard(box, d, `L${g.featLayer[i]} #${g.featIndex[i]} · ${g.featLabel[i] || dashboardLabel(d) || "no label"}`);
  renderLabels(); // its fallback label may be new
}

// ---------------------------------------------------------------- pins, supernodes
const pinned = (i) => S.pins.includes(i);
const grouped = () => new Set(S.supernodes.flatMap((s) => s.members));

function togglePin(i) {
  if (i === null || i === undefined) return;
  S.pins = pinned(i) ? S.pins.filter((j) => j !== i) : [...S.pins, i];
  afterChange();
}

function groupPins() {
  if (!S.pins.length) throw new Error("Pin some nodes before grouping them.");
  const label = $("#group-label").value.trim() || `group ${S.supernodes.length + 1}`;
  S.supernodes.push({ label, members: [...S.pins] });
  S.pins = [];
  $("#group-label").value = "";
  afterChange();
}

function renderPins() {
  const g = S.g;
  $("#pinned").replaceChildren(...S.pins.map((i) => el("li", { dataset: { nodeId: g.ids[i] }, title: `${nodeWhere(g, i)} · ${g.ids[i]}`, onclick: () => select(i) },
    el("button", { class: "remove", type: "button", title: "unpin", onclick: (e) => { e.stopPropagation(); togglePin(i); } }, "×"),
    nodeLabel(g, i))));
  $("#supernodes").replaceChildren(...S.supernodes.map((s, k) => el("li", { dataset: { label: s.label }, title: s.members.map((i) => g.ids[i]).join(", ") },
    el("button", { class: "remove", type: "button", title: "ungroup", onclick: () => { S.supernodes.splice(k, 1); afterChange(); } }, "×"),
    `${s.label} (${s.members.length})`)));
  renderTargets(S.supernodes);
  $("#tab-subgraph").textContent = `Subgraph (${S.pins.length + S.supernodes.length})`;
}

// ---------------------------------------------------------------- rendering after any change
function afterChange() {
  if (!S.g) return;
  view.setFocus({ selected: S.selected, pinned: new Set(S.pins), grouped: grouped() });
  renderLabels();
  showDashboard(S.selected);
  writeUrl({ graph: S.graphId, prompt: promptText(S.g), nodeThreshold: S.nodeThreshold, edgeThreshold: S.edgeThreshold,
    selected: S.selected === null ? null : S.g.ids[S.selected], pins: S.pins.map((i) => S.g.ids[i]),
    supernodes: S.supernodes.map((s) => ({ label: s.label, ids: s.members.map((i) => S.g.ids[i]) })),
    view: S.view, showErrors: S.showErrors, allEdges: S.allEdges });
}

// Everything that shows node names (they change as dashboards arrive).
const refreshLabels = (g) => { if (g === S.g) renderLabels(); };
function renderLabels() {
  const g = S.g;
  if (S.selected !== null) {
    const ends = [...incoming(S.p, S.selected).slice(0, 20)].map((e) => S.p.edges.src[e])
      .concat([...outgoing(S.p, S.selected).slice(0, 20)].map((e) => S.p.edges.dst[e]));
    wantLabels(g, [S.selected, ...ends, ...S.pins, ...S.supernodes.flatMap((s) => s.members)], refreshLabels);
  }
  renderNodePanel($("#panel"), S.selected, { g, p: S.p, label: (i) => nodeLabel(g, i), where: (i) => nodeWhere(g, i),
    pinned: pinned(S.selected), onSelect: select, onPin: () => togglePin(S.selected) });
  renderPins();
  if (S.view === "subgraph") drawSubgraph();
  view.updateTip();
}

function drawSubgraph() {
  const r = $("#subgraph-wrap").getBoundingClientRect();
  renderSubgraph($("#subgraph"), { g: S.g, pins: S.pins, supernodes: S.supernodes, selected: S.selected,
    label: (i) => nodeLabel(S.g, i), where: (i) => nodeWhere(S.g, i), onSelect: select,
    width: Math.max(300, r.width), height: Math.max(200, r.height) });
}

function setView(v) {
  S.view = v;
  $("#graph-wrap").hidden = v !== "graph";
  $("#subgraph-wrap").hidden = v !== "subgraph";
  $("#tab-graph").classList.toggle("active", v === "graph");
  $("#tab-subgraph").classList.toggle("active", v === "subgraph");
  if (!S.g) return;
  if (v === "graph") view.relayout(); else drawSubgraph();
  afterChange();
}

// ---------------------------------------------------------------- downloads
const baseName = () => `attribution-${S.graphId}`;

async function downloadJson() {
  download(await api.graphJsonBlob(S.graphId, S.nodeThreshold, S.edgeThreshold), `${baseName()}.json`);
}

function downloadSvg() {
  if (S.view !== "subgraph") setView("subgraph");
  download(subgraphSvgBlob($("#subgraph")), `${baseName()}-subgraph.svg`);
}

// ---------------------------------------------------------------- test hook (see the header comment)
window.__explorer = {
  ready: false, stats: { nodes: 0, edges: 0 }, timings,
  settled: labelsSettled,
  geometry: () => view.geometry(),
  select: (id) => select(S.g.index.get(id) ?? null),
  pin: (id) => { const i = S.g.index.get(id); if (i !== undefined && !pinned(i)) togglePin(i); },
  nodes: () => [...(view.lay?.nodes || [])].map((i) => ({ id: S.g.ids[i], type: TYPE_NAMES[S.g.type[i]], layer: S.g.layer[i], pos: S.g.pos[i] })),
  selectedEdges: () => (S.selected === null ? 0 : incoming(S.p, S.selected).length + outgoing(S.p, S.selected).length),
};

// ---------------------------------------------------------------- wiring
function init() {
  $("#form").addEventListener("submit", (e) => { e.preventDefault(); safe(run)(); });
  $("#cancel").addEventListener("click", safe(cancelJob));
  $("#recent").addEventListener("change", safe(() => $("#recent").value && openGraph($("#recent").value, null)));
  $("#node-threshold").addEventListener("input", onThresholds);
  $("#edge-threshold").addEventListener("input", onThresholds);
  $("#all-edges").addEventListener("change", (e) => { S.allEdges = e.target.checked; if (S.g) { view.set(S.g, S.p, { allEdges: S.allEdges }); afterChange(); } });
  $("#show-errors").addEventListener("change", (e) => { S.showErrors = e.target.checked; if (S.g) { view.set(S.g, S.p, { showErrors: S.showErrors }); afterChange(); } });
  $("#tab-graph").addEventListener("click", () => setView("graph"));
  $("#tab-subgraph").addEventListener("click", () => setView("subgraph"));
  $("#group").addEventListener("click", safe(groupPins));
  $("#group-label").addEventListener("keydown", (e) => { if (e.key === "Enter") safe(groupPins)(); });
  $("#download-json").addEventListener("click", safe(downloadJson));
  $("#download-msgpack").addEventListener("click", () => download(new Blob([S.bytes], { type: "application/msgpack" }), `${baseName()}.msgpack`));
  $("#download-png").addEventListener("click", safe(async () => download(await view.pngBlob(), `${baseName()}.png`)));
  $("#download-svg").addEventListener("click", downloadSvg);
  $("#influence-help").title = INFLUENCE_HELP;
  setupInterventions(() => (S.g ? { g: S.g, selected: S.selected, pins: S.pins, supernodes: S.supernodes } : null), showError);
  renderTargets([]);
  new ResizeObserver(() => { if (S.g && S.view === "graph") view.relayout(); else if (S.g) drawSubgraph(); }).observe($("#views"));
  window.addEventListener("hashchange", safe(() => {
    const u = readUrl();
    if (u.graph && u.graph !== S.graphId) return openGraph(u.graph, u);
  }));
  const u = readUrl();
  if (u.prompt) $("#prompt").value = u.prompt;
  setThresholdInputs(u.nodeThreshold ?? S.nodeThreshold, u.edgeThreshold ?? S.edgeThreshold);
  renderNodePanel($("#panel"), null, {});
  safe(async () => {
    await loadModels().catch((e) => showError(`models: ${e.message}`));
    await Promise.all([u.graph ? openGraph(u.graph, u) : null, loadRecent().catch(() => {})]);
  })();
}

init();
