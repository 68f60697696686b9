// attribute-ray web UI: run prompts, stream progress, draw attribution graphs on a canvas,
// inspect nodes / feature dashboards, pin nodes, group supernodes, share state via the URL hash.
// Plain ES2020, no build step. The only dependency is the vendored MessagePack UMD build.
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);

  // ---------------------------------------------------------------- state
  const state = {
    models: null,          // GET /v1/models
    graphId: null,
    graph: null,           // Neuronpedia JSON fetched with node_threshold=1 (all nodes)
    msgpackBytes: null,    // raw Uint8Array of the msgpack graph (download + scores)
    wire: null,            // decoded msgpack (format, scores, n_layers, ...)
    nodes: [],             // graph.nodes plus layout fields (x, y, row, idx)
    byId: new Map(),       // node_id -> node
    links: [],             // {s, t, weight} with node indices
    inEdges: [], outEdges: [], // per node index: list of link indices
    nLayers: 0,
    colX: [], colW: [],    // per token column: left x and width in graph units
    rowH: 90,              // graph units per layer row (set per graph in buildModel)
    visible: new Uint8Array(0),
    visibleLinks: [],      // link indices currently drawn
    threshold: 0.8,
    subgraph: false,
    pinned: new Set(),
    supernodes: [],        // [{label, ids: [node_id]}]
    selected: null,        // node_id
    view: { x: 0, y: 0, k: 1 }, // screen = graph * k + (x, y), in CSS pixels
    loadSeq: 0,            // guards against out-of-order async responses
    dashSeq: 0,
    job: null,             // running stream job id (for cancel)
    ivSeq: 0,              // drops intervention / steer replies that a newer request or graph superseded
  };

  // Graph-space geometry. Rows are fixed height; columns widen with their busiest cell.
  const ROW_H = 90, /* minimum; see state.rowH */ MIN_COL_W = 110, NODE_SPACING = 14, NODE_R = 5;
  const MARGIN = { left: 50, bottom: 40, top: 70 }; // screen px reserved for axes / logit labels

  // ---------------------------------------------------------------- helpers
  function fmt(x, d = 3) {
    if (x === undefined || x === null || Number.isNaN(x)) return "–";
    return typeof x === "number" ? x.toFixed(d) : String(x);
  }

  function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") e.className = v;
      else if (k === "dataset") Object.assign(e.dataset, v);
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  // FastAPI errors come as {"detail": str} or {"detail": [{loc, msg}]} (validation errors).
  function detailText(body, status) {
    const d = body && body.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((x) => `${(x.loc || []).join(".")}: ${x.msg}`).join("\n");
    return `HTTP ${status}`;
  }

  async function httpError(res) {
    let body = null;
    try { body = await res.json(); } catch (_) { /* not JSON */ }
    const err = new Error(detailText(body, res.status));
    err.status = res.status;
    return err;
  }

  async function getJSON(url) {
    const res = await fetch(url, { headers: { Accept: "application/json" } });
    if (!res.ok) throw await httpError(res);
    return res.json();
  }

  async function postJSON(url, body) {
    const res = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
    });
    if (!res.ok) throw await httpError(res);
    return res.json();
  }

  function showError(msg) {
    const box = $("#error");
    box.textContent = msg || "";
    box.hidden = !msg;
  }

  // Wrap async event handlers so failures land in #error instead of the console.
  const safe = (fn) => (...args) => Promise.resolve().then(() => fn(...args)).catch((e) => showError(e.message || String(e)));

  function download(blob, name) {
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  // ---------------------------------------------------------------- model info + form defaults
  async function loadModels() {
    const m = await getJSON("/v1/models");
    state.models = m;
    $("#model-info").textContent =
      `model ${m.model} · transcoder ${m.transcoder} · ${m.n_layers} layers · d_model ${m.d_model}`;
    const d = m.defaults || {};
    const set = (id, v) => { if (v !== null && v !== undefined) $(id).value = v; };
    set("#max-feature-nodes", d.max_feature_nodes);
    set("#max-n-logits", d.max_n_logits);
    set("#desired-logit-prob", d.desired_logit_prob);
    set("#batch-size", d.batch_size);
    set("#edge-threshold", d.edge_threshold);
    if (d.node_threshold !== undefined && !location.hash.includes("threshold=")) setThreshold(d.node_threshold, false);
  }

  async function loadRecent() {
    const { graphs } = await getJSON("/v1/graphs");
    const ul = $("#recent");
    ul.replaceChildren(...graphs.map((g) => {
      const when = g.created ? new Date(g.created * 1000).toLocaleString() : "";
      const btn = el("button", { type: "button", title: `${g.prompt}\n${when}`, dataset: { graphId: g.graph_id } }, g.prompt);
      if (g.graph_id === state.graphId) btn.classList.add("active");
      btn.addEventListener("click", safe(() => openGraph(g.graph_id)));
      return el("li", {}, btn);
    }));
  }

  // ---------------------------------------------------------------- running a prompt (NDJSON stream)
  function formBody() {
    const body = { prompt: $("#prompt").value };
    const num = (id, key, int) => {
      const raw = $(id).value.trim();
      if (raw !== "") body[key] = int ? parseInt(raw, 10) : parseFloat(raw);
    };
    num("#max-feature-nodes", "max_feature_nodes", true);
    num("#max-n-logits", "max_n_logits", true);
    num("#desired-logit-prob", "desired_logit_prob", false);
    num("#batch-size", "batch_size", true);
    num("#edge-threshold", "edge_threshold", false);
    return body;
  }

  function setProgress(phase, done, total) {
    $("#progress").hidden = false;
    const bar = $("#progress-bar");
    if (total > 0) { bar.max = total; bar.value = done; } else bar.removeAttribute("value");
    $("#progress-text").textContent = total > 0 ? `${phase}: ${done}/${total}` : phase;
  }

  async function runPrompt() {
    showError("");
    const body = formBody();
    if (!body.prompt.trim()) { showError("Enter a prompt first."); return; }
    $("#run").disabled = true;
    setProgress("submitting", 0, 0);
    try {
      const res = await fetch("/v1/graphs/stream", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/x-ndjson" },
        body: JSON.stringify(body),
      });
      if (!res.ok) throw await httpError(res);
      let graphId = null;
      await readNDJSON(res, (ev) => {
        if (ev.event === "queued") {
          state.job = ev.job_id;
          $("#cancel").hidden = false;
          setProgress("queued", 0, 0);
        } else if (ev.event === "progress") setProgress(ev.phase, ev.done, ev.total);
        else if (ev.event === "done") { graphId = ev.graph_id; setProgress(ev.cached ? "done (cached)" : "done", 1, 1); }
        else if (ev.event === "failed") throw new Error(`graph failed: ${ev.error}`);
        else if (ev.event === "cancelled") setProgress("cancelled", 0, 1);
      });
      if (graphId) {
        await openGraph(graphId);
        await loadRecent();
      }
    } catch (e) {
      setProgress("error", 0, 1);
      throw e;
    } finally {
      state.job = null;
      $("#cancel").hidden = true;
      $("#run").disabled = false;
    }
  }

  // Reads a fetch Response body line by line; lines may be split across chunks.
  async function readNDJSON(res, onEvent) {
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (line) onEvent(JSON.parse(line));
      }
      if (done) break;
    }
    if (buf.trim()) onEvent(JSON.parse(buf));
  }

  async function cancelJob() {
    if (!state.job) return;
    const res = await fetch(`/v1/jobs/${encodeURIComponent(state.job)}`, { method: "DELETE" });
    if (!res.ok) throw await httpError(res);
  }

  // ---------------------------------------------------------------- loading a graph
  // restore: {pinned, supernodes, threshold} from the URL hash, or null for a fresh view.
  async function openGraph(id, restore = null) {
    const seq = ++state.loadSeq;
    window.__graphReady = false;
    showError("");
    $("#info").textContent = "Loading graph…";
    const jsonUrl = `/v1/graphs/${encodeURIComponent(id)}?node_threshold=1&edge_threshold=${encodeURIComponent(edgeThreshold())}`;
    // The msgpack is only for scores + download: a failure there must not block the view.
    const [graph, packed] = await Promise.all([
      getJSON(jsonUrl),
      fetchMsgpack(id).catch((e) => ({ error: e })),
    ]);
    if (seq !== state.loadSeq) return; // a newer openGraph won
    state.graphId = id;
    state.graph = graph;
    state.msgpackBytes = packed.bytes || null;
    state.wire = packed.wire || null;
    buildModel(graph);
    state.pinned = new Set((restore?.pinned || []).filter((n) => state.byId.has(n)));
    state.supernodes = (restore?.supernodes || [])
      .map((s) => ({ label: s.label, ids: s.ids.filter((n) => state.byId.has(n)) }))
      .filter((s) => s.ids.length);
    state.selected = null;
    state.ivSeq++;
    $("#iv-result").replaceChildren();
    if (restore?.threshold !== undefined) setThreshold(restore.threshold, false);
    for (const b of ["#download-json", "#download-png", "#download-svg"]) $(b).disabled = false;
    $("#download-msgpack").disabled = !state.msgpackBytes;
    renderInfo(packed.error);
    renderPanel();
    renderPinned();
    renderSupernodes();
    for (const b of document.querySelectorAll("#recent [data-graph-id]")) b.classList.toggle("active", b.dataset.graphId === id);
    updateVisibility();
    fitView();
    draw();
    writeHash();
    window.__graphReady = true;
  }

  function edgeThreshold() {
    const v = parseFloat($("#edge-threshold").value);
    return Number.isFinite(v) ? v : 0.98;
  }

  async function fetchMsgpack(id) {
    const res = await fetch(`/v1/graphs/${encodeURIComponent(id)}`, { headers: { Accept: "application/msgpack" } });
    if (!res.ok) throw await httpError(res);
    const bytes = new Uint8Array(await res.arrayBuffer());
    return { bytes, wire: MessagePack.decode(bytes) };
  }

  function renderInfo(msgpackError) {
    const meta = state.graph.metadata || {};
    const parts = [`“${meta.prompt || ""}”`, `${state.nodes.length} nodes / ${state.links.length} edges total`];
    const sc = state.wire && state.wire.scores;
    if (sc) parts.push(`replacement ${fmt(sc.replacement)}`, `completeness ${fmt(sc.completeness)}`);
    else if (msgpackError) parts.push(`scores unavailable (${msgpackError.message})`);
    parts.push(`id ${state.graphId}`);
    $("#info").textContent = parts.join(" · ");
  }

  // Row index: 0 = embeddings, 1..L = transformer layers, L+1 = logits.
  function rowOf(n, L) {
    if (n.feature_type === "embedding" || n.layer === "E") return 0;
    if (n.feature_type === "logit") return L + 1;
    return Math.min(parseInt(n.layer, 10) + 1, L);
  }

  function buildModel(graph) {
    const nodes = graph.nodes;
    const tokens = graph.metadata?.prompt_tokens || [];
    // Layer count from the graph itself (logits sit on layer str(L+1)), else the msgpack/model info.
    const lg = nodes.find((n) => n.feature_type === "logit");
    const maxFeatLayer = Math.max(-1, ...nodes.filter((n) => n.layer !== "E" && n.feature_type !== "logit").map((n) => parseInt(n.layer, 10) || 0));
    let L = lg ? parseInt(lg.layer, 10) - 1 : (state.wire?.n_layers || state.models?.n_layers || 0);
    L = Math.max(L, maxFeatLayer + 1, 1);
    state.nLayers = L;
    const nCols = Math.max(tokens.length, 1 + Math.max(0, ...nodes.map((n) => n.ctx_idx)));

    // Group nodes per cell; sort inside a cell by importance so the layout is stable and readable.
    const cells = new Map();
    state.byId = new Map();
    nodes.forEach((n, i) => {
      n.idx = i;
      n.row = rowOf(n, L);
      state.byId.set(n.node_id, n);
      const key = `${n.ctx_idx}:${n.row}`;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    });
    const colMax = new Array(nCols).fill(1);
    for (const list of cells.values()) {
      const c = list[0].ctx_idx;
      colMax[c] = Math.max(colMax[c], list.length);
    }
    state.colW = colMax.map((m) => Math.max(MIN_COL_W, (m + 1) * NODE_SPACING));
    state.colX = [];
    let x = 0;
    for (const w of state.colW) { state.colX.push(x); x += w; }
    state.tokens = tokens;
    // Row height follows the canvas aspect ratio so a wide prompt does not squash the layers flat.
    const r = canvas.getBoundingClientRect();
    const aspect = r.width > 0 ? Math.max(0.2, (r.height - MARGIN.top - MARGIN.bottom) / (r.width - MARGIN.left - 70)) : 0.6;
    state.rowH = Math.max(ROW_H, (x * aspect) / (L + 1));
    for (const list of cells.values()) {
      list.sort((a, b) => (a.influence ?? -(a.token_prob ?? 0)) - (b.influence ?? -(b.token_prob ?? 0)));
      const c = list[0].ctx_idx;
      const w = state.colW[c];
      // Spread evenly but not wider than the column; centre the group in the cell.
      const step = Math.min(NODE_SPACING * 1.6, w / (list.length + 1));
      const x0 = state.colX[c] + w / 2 - (step * (list.length - 1)) / 2;
      list.forEach((n, j) => {
        n.x = x0 + j * step;
        n.y = -n.row * state.rowH; // graph y grows downward, so negate: embeddings at the bottom
      });
    }

    state.links = [];
    state.inEdges = nodes.map(() => []);
    state.outEdges = nodes.map(() => []);
    for (const l of graph.links) {
      const s = state.byId.get(l.source), t = state.byId.get(l.target);
      if (!s || !t) continue;
      const li = state.links.length;
      state.links.push({ s: s.idx, t: t.idx, weight: l.weight });
      state.outEdges[s.idx].push(li);
      state.inEdges[t.idx].push(li);
    }
    state.nodes = nodes;
  }

  // ---------------------------------------------------------------- visibility
  // node.feature is the Cantor pair of (layer, index) (schema_version 1); the index is the middle of node_id.
  function featureIndex(n) { return Number(n.node_id.split("_")[1]); }

  function alwaysShown(n) { return n.feature_type === "embedding" || n.feature_type === "logit"; }

  function subgraphIds() {
    const ids = new Set(state.pinned);
    for (const s of state.supernodes) for (const id of s.ids) ids.add(id);
    return ids;
  }

  function updateVisibility() {
    const vis = new Uint8Array(state.nodes.length);
    const th = state.threshold + 1e-9; // slider values are rounded to 0.01
    const sub = state.subgraph ? subgraphIds() : null;
    state.nodes.forEach((n, i) => {
      if (sub) vis[i] = sub.has(n.node_id) ? 1 : 0;
      else vis[i] = alwaysShown(n) || (n.influence ?? Infinity) <= th ? 1 : 0;
    });
    state.visible = vis;
    state.visibleLinks = [];
    state.links.forEach((l, i) => { if (vis[l.s] && vis[l.t]) state.visibleLinks.push(i); });
    let nVis = 0;
    for (const v of vis) nVis += v;
    const stats = { nodes: nVis, edges: state.visibleLinks.length };
    $("#counts").textContent = `${stats.nodes} nodes, ${stats.edges} edges`;
    window.__graphStats = stats;
  }

  function setThreshold(v, rerender = true) {
    const t = Math.min(1, Math.max(0, Number(v)));
    if (!Number.isFinite(t)) return;
    state.threshold = t;
    $("#node-threshold").value = String(t);
    $("#threshold-value").textContent = t.toFixed(2);
    if (rerender && state.graph) {
      updateVisibility();
      draw();
      renderPanel();
      writeHash();
    }
  }

  // ---------------------------------------------------------------- drawing
  const canvas = $("#graph");
  const ctx = canvas.getContext("2d");

  function resizeCanvas() {
    const dpr = window.devicePixelRatio || 1;
    const r = canvas.getBoundingClientRect();
    canvas.width = Math.max(1, Math.round(r.width * dpr));
    canvas.height = Math.max(1, Math.round(r.height * dpr));
    draw();
  }

  function graphBounds() {
    const w = state.colX.length ? state.colX[state.colX.length - 1] + state.colW[state.colW.length - 1] : 1;
    return { x0: 0, x1: w, y0: -(state.nLayers + 1) * state.rowH, y1: 0 };
  }

  function fitView() {
    const r = canvas.getBoundingClientRect();
    const b = graphBounds();
    const w = Math.max(1, r.width - MARGIN.left - 70), h = Math.max(1, r.height - MARGIN.top - MARGIN.bottom);
    const k = Math.min(w / (b.x1 - b.x0), h / (b.y1 - b.y0 || 1), 4);
    state.view = {
      k,
      x: MARGIN.left + (w - (b.x1 - b.x0) * k) / 2 - b.x0 * k,
      y: MARGIN.top + (h - (b.y1 - b.y0) * k) / 2 - b.y0 * k,
    };
  }

  const COLORS = {
    "cross layer transcoder": "#ef6c00",
    "mlp reconstruction error": "#9e9e9e",
    embedding: "#2e7d32",
    logit: "#6a1b9a",
  };
  const N_BUCKETS = 6;

  function drawEdges(c, k) {
    const vl = state.visibleLinks;
    let maxW = 0;
    for (const i of vl) maxW = Math.max(maxW, Math.abs(state.links[i].weight));
    if (!maxW) return;
    // One path per (sign, width bucket): thousands of strokes collapse into a dozen.
    const paths = [];
    for (let s = 0; s < 2; s++) for (let b = 0; b < N_BUCKETS; b++) paths.push(new Path2D());
    for (const i of vl) {
      const l = state.links[i];
      const rel = Math.abs(l.weight) / maxW;
      const b = Math.min(N_BUCKETS - 1, Math.floor(Math.sqrt(rel) * N_BUCKETS));
      const p = paths[(l.weight < 0 ? N_BUCKETS : 0) + b];
      const a = state.nodes[l.s], t = state.nodes[l.t];
      p.moveTo(a.x, a.y);
      p.lineTo(t.x, t.y);
    }
    paths.forEach((p, j) => {
      const neg = j >= N_BUCKETS, b = j % N_BUCKETS;
      const frac = (b + 1) / N_BUCKETS;
      c.strokeStyle = neg ? `rgba(211,47,47,${0.12 + 0.55 * frac})` : `rgba(30,100,210,${0.12 + 0.55 * frac})`;
      c.lineWidth = (0.4 + 4 * frac * frac) / k; // screen-constant width
      c.stroke(p);
    });
  }

  function nodeShape(c, n, r) {
    c.beginPath();
    switch (n.feature_type) {
      case "mlp reconstruction error": c.rect(n.x - r, n.y - r, 2 * r, 2 * r); break;
      case "embedding": c.moveTo(n.x, n.y - r * 1.3); c.lineTo(n.x + r * 1.3, n.y); c.lineTo(n.x, n.y + r * 1.3); c.lineTo(n.x - r * 1.3, n.y); c.closePath(); break;
      case "logit": c.moveTo(n.x, n.y - r * 1.3); c.lineTo(n.x + r * 1.2, n.y + r); c.lineTo(n.x - r * 1.2, n.y + r); c.closePath(); break;
      default: c.arc(n.x, n.y, r, 0, Math.PI * 2);
    }
  }

  function drawNodes(c, k) {
    const r = NODE_R / Math.sqrt(k); // grows slower than the zoom so dense cells stay legible
    const sel = state.selected;
    const inSuper = new Set();
    for (const s of state.supernodes) for (const id of s.ids) inSuper.add(id);
    state.nodes.forEach((n, i) => {
      if (!state.visible[i]) return;
      nodeShape(c, n, r);
      c.fillStyle = COLORS[n.feature_type] || "#555";
      c.fill();
      c.lineWidth = 1 / k;
      c.strokeStyle = "#fff";
      c.stroke();
      if (state.pinned.has(n.node_id) || inSuper.has(n.node_id)) {
        nodeShape(c, n, r + 3 / k);
        c.lineWidth = 2.5 / k;
        c.strokeStyle = state.pinned.has(n.node_id) ? "#fbc02d" : "#00897b";
        c.stroke();
      }
      if (n.node_id === sel) {
        nodeShape(c, n, r + 6 / k);
        c.lineWidth = 2 / k;
        c.strokeStyle = "#000";
        c.stroke();
      }
    });
  }

  // Supernodes: a dashed box around their visible members, with the label on top.
  function drawSupernodes(c, k) {
    c.font = `${11 / k}px system-ui, sans-serif`;
    for (const s of state.supernodes) {
      const ms = s.ids.map((id) => state.byId.get(id)).filter((n) => n && state.visible[n.idx]);
      if (!ms.length) continue;
      const pad = 10 / k;
      const x0 = Math.min(...ms.map((n) => n.x)) - pad, x1 = Math.max(...ms.map((n) => n.x)) + pad;
      const y0 = Math.min(...ms.map((n) => n.y)) - pad, y1 = Math.max(...ms.map((n) => n.y)) + pad;
      c.setLineDash([4 / k, 3 / k]);
      c.strokeStyle = "#00897b";
      c.lineWidth = 1.5 / k;
      c.strokeRect(x0, y0, x1 - x0, y1 - y0);
      c.setLineDash([]);
      c.fillStyle = "#00695c";
      c.fillText(s.label, x0, y0 - 3 / k);
    }
  }

  // Highlight the selected node's visible edges on top of everything else.
  function drawSelectedEdges(c, k) {
    const n = state.selected && state.byId.get(state.selected);
    if (!n) return;
    c.lineWidth = 2 / k;
    for (const li of [...state.inEdges[n.idx], ...state.outEdges[n.idx]]) {
      const l = state.links[li];
      if (!state.visible[l.s] || !state.visible[l.t]) continue;
      const a = state.nodes[l.s], b = state.nodes[l.t];
      c.strokeStyle = l.weight < 0 ? "rgba(211,47,47,0.9)" : "rgba(30,100,210,0.9)";
      c.beginPath(); c.moveTo(a.x, a.y); c.lineTo(b.x, b.y); c.stroke();
    }
  }

  // Axes are drawn in screen space so labels keep their size while zooming.
  function drawAxes(c, w, h) {
    const { x: tx, y: ty, k } = state.view;
    c.font = "11px system-ui, sans-serif";
    c.fillStyle = "#444";
    c.textAlign = "center";
    c.textBaseline = "bottom";
    // Faint column separators + token labels along the bottom.
    c.strokeStyle = "#eee";
    c.lineWidth = 1;
    state.tokens.forEach((tok, i) => {
      const sx = tx + state.colX[i] * k;
      c.beginPath(); c.moveTo(sx, 0); c.lineTo(sx, h - 20); c.stroke();
      const cx = tx + (state.colX[i] + state.colW[i] / 2) * k;
      const text = tok.length > 14 ? tok.slice(0, 13) + "…" : tok;
      // Only label columns wide enough on screen; zoom in to see the rest.
      if (c.measureText(text).width < state.colW[i] * k - 4) c.fillText(text, cx, h - 4);
    });
    // Layer labels on the left.
    c.textAlign = "left";
    c.textBaseline = "middle";
    for (let row = 0; row <= state.nLayers + 1; row++) {
      const sy = ty - row * state.rowH * k;
      if (sy < -10 || sy > h) continue;
      const label = row === 0 ? "Emb" : row === state.nLayers + 1 ? "Logit" : `L${row - 1}`;
      c.fillStyle = "rgba(255,255,255,0.85)";
      c.fillRect(0, sy - 8, 40, 16);
      c.fillStyle = "#666";
      c.fillText(label, 4, sy);
    }
    // Logit labels: token and probability, rotated above each visible logit node.
    c.fillStyle = "#4a148c";
    for (const n of state.nodes) {
      if (n.feature_type !== "logit" || !state.visible[n.idx]) continue;
      const sx = tx + n.x * k, sy = ty + n.y * k;
      c.save();
      c.translate(sx, sy - 10);
      c.rotate(-Math.PI / 4);
      c.fillText(`${logitToken(n)} ${fmt(n.token_prob, 2)}`, 0, 0);
      c.restore();
    }
  }

  function logitToken(n) {
    const m = /^Output "(.*)" \(p=/.exec(n.clerp || "");
    return m ? m[1] : n.clerp || `tok ${n.feature}`;
  }

  function draw() {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.width / dpr, h = canvas.height / dpr;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!state.graph) return;
    const { x, y, k } = state.view;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    drawAxesBackground(ctx, w, h);
    ctx.setTransform(dpr * k, 0, 0, dpr * k, dpr * x, dpr * y);
    drawEdges(ctx, k);
    drawSelectedEdges(ctx, k);
    drawNodes(ctx, k);
    drawSupernodes(ctx, k);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    drawAxes(ctx, w, h);
  }

  function drawAxesBackground(c, w, h) {
    c.fillStyle = "#fff";
    c.fillRect(0, 0, w, h);
  }

  // ---------------------------------------------------------------- interaction: pan, zoom, hit-test
  function toGraph(sx, sy) {
    const { x, y, k } = state.view;
    return { x: (sx - x) / k, y: (sy - y) / k };
  }

  function hitTest(sx, sy) {
    const p = toGraph(sx, sy);
    const k = state.view.k;
    const r = (NODE_R / Math.sqrt(k)) + 4 / k; // node radius plus a few screen pixels of slack
    let best = null, bestD = r * r;
    for (const n of state.nodes) {
      if (!state.visible[n.idx]) continue;
      const d = (n.x - p.x) ** 2 + (n.y - p.y) ** 2;
      if (d <= bestD) { best = n; bestD = d; }
    }
    return best;
  }

  function setupCanvasEvents() {
    let drag = null;
    canvas.addEventListener("mousedown", (e) => {
      drag = { sx: e.clientX, sy: e.clientY, vx: state.view.x, vy: state.view.y, moved: false };
    });
    window.addEventListener("mousemove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.sx, dy = e.clientY - drag.sy;
      if (!drag.moved && Math.hypot(dx, dy) < 4) return; // small jitter is still a click
      drag.moved = true;
      canvas.classList.add("dragging");
      state.view.x = drag.vx + dx;
      state.view.y = drag.vy + dy;
      draw();
    });
    window.addEventListener("mouseup", (e) => {
      if (!drag) return;
      const wasClick = !drag.moved && e.target === canvas;
      drag = null;
      canvas.classList.remove("dragging");
      if (wasClick && state.graph) {
        const r = canvas.getBoundingClientRect();
        const n = hitTest(e.clientX - r.left, e.clientY - r.top);
        selectNode(n ? n.node_id : null);
      }
    });
    canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = canvas.getBoundingClientRect();
      const sx = e.clientX - r.left, sy = e.clientY - r.top;
      const p = toGraph(sx, sy);
      const k = Math.min(50, Math.max(0.02, state.view.k * Math.exp(-e.deltaY * 0.0015)));
      // Keep the graph point under the cursor fixed while zooming.
      state.view = { k, x: sx - p.x * k, y: sy - p.y * k };
      draw();
    }, { passive: false });
    canvas.addEventListener("mousemove", (e) => {
      if (drag || !state.graph) return;
      const r = canvas.getBoundingClientRect();
      const n = hitTest(e.clientX - r.left, e.clientY - r.top);
      canvas.title = n ? `${nodeLabel(n)} (${n.feature_type})` : "";
    });
  }

  // ---------------------------------------------------------------- node panel
  function nodeLabel(n) {
    if (n.clerp) return n.clerp;
    const tok = state.tokens?.[n.ctx_idx] ?? "";
    switch (n.feature_type) {
      case "embedding": return `Emb "${tok}"`;
      case "logit": return `Output "${logitToken(n)}"`;
      case "mlp reconstruction error": return `Error L${n.layer} @ "${tok}"`;
      default: return `L${n.layer} #${featureIndex(n)} @ "${tok}"`;
    }
  }

  function selectNode(id) {
    state.selected = id && state.byId.has(id) ? id : null;
    renderPanel();
    draw();
    return state.selected !== null;
  }

  function topEdges(list, otherEnd) {
    return list
      .map((li) => state.links[li])
      .filter((l) => state.visible[l.s] && state.visible[l.t])
      .sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight))
      .slice(0, 10)
      .map((l) => {
        const o = state.nodes[otherEnd(l)];
        return el("div", { class: "edge-item", dataset: { nodeId: o.node_id }, title: o.node_id, onclick: () => selectNode(o.node_id) },
          el("span", {}, nodeLabel(o)),
          el("span", { class: `w ${l.weight < 0 ? "neg" : "pos"}` }, fmt(l.weight)));
      });
  }

  function renderPanel() {
    const panel = $("#panel");
    const n = state.selected && state.byId.get(state.selected);
    $("#pin").disabled = !n;
    if (!n) {
      panel.replaceChildren(el("p", { class: "muted" }, "Click a node to inspect it."));
      $("#pin").textContent = "Pin";
      return;
    }
    $("#pin").textContent = state.pinned.has(n.node_id) ? "Unpin" : "Pin";
    const kv = el("dl", { class: "kv" });
    const add = (k, v) => kv.append(el("dt", {}, k), el("dd", {}, v));
    add("id", n.node_id);
    add("type", n.feature_type);
    add("layer", n.layer);
    add("position", `${n.ctx_idx} "${state.tokens[n.ctx_idx] ?? ""}"`);
    if (n.feature_type === "cross layer transcoder") add("feature", String(featureIndex(n)));
    if (n.activation !== undefined) add("activation", fmt(n.activation));
    if (n.influence !== undefined) add("influence", fmt(n.influence));
    if (n.token_prob !== undefined && n.feature_type === "logit") add("probability", fmt(n.token_prob));
    if (!state.visible[n.idx]) add("note", "hidden at this threshold");
    const inc = topEdges(state.inEdges[n.idx], (l) => l.s);
    const out = topEdges(state.outEdges[n.idx], (l) => l.t);
    const dash = el("div", { id: "dashboard" });
    panel.replaceChildren(
      el("h3", {}, nodeLabel(n)), kv,
      el("h3", {}, `Incoming (${inc.length})`), ...(inc.length ? inc : [el("p", { class: "muted" }, "none visible")]),
      el("h3", {}, `Outgoing (${out.length})`), ...(out.length ? out : [el("p", { class: "muted" }, "none visible")]),
      dash,
    );
    if (n.feature_type === "cross layer transcoder") loadDashboard(n, dash);
  }

  // Dashboard responses are cached; a sequence number drops replies for a node no longer selected.
  const dashCache = new Map();
  async function loadDashboard(n, box) {
    const seq = ++state.dashSeq;
    const key = `${n.layer}/${featureIndex(n)}`;
    box.replaceChildren(el("p", { class: "muted" }, "loading dashboard…"));
    let dash = dashCache.get(key);
    if (dash === undefined) {
      try {
        dash = await getJSON(`/v1/features/${encodeURIComponent(n.layer)}/${featureIndex(n)}`);
      } catch (e) {
        if (e.status !== 404) { if (seq === state.dashSeq) box.replaceChildren(el("p", { class: "muted" }, `dashboard error: ${e.message}`)); return; }
        dash = null;
      }
      dashCache.set(key, dash);
    }
    if (seq !== state.dashSeq) return;
    if (!dash) { box.replaceChildren(el("p", { class: "muted" }, "no dashboard")); return; }
    renderDashboard(dash, box);
  }

  function renderDashboard(d, box) {
    const logits = (cls, list) => el("div", { class: `logits ${cls}` }, ...(list || []).map((t) => el("span", {}, t)));
    const parts = [
      el("h3", {}, "Feature dashboard"),
      el("div", {}, `frequency ${fmt(d.activation_frequency, 5)} · act ${fmt(d.act_min, 2)}–${fmt(d.act_max, 2)}`),
      histogram(d.histogram || []),
      el("div", { class: "muted" }, "top logits"), logits("top", d.top_logits),
      el("div", { class: "muted" }, "bottom logits"), logits("bottom", d.bottom_logits),
    ];
    for (const q of d.examples_quantiles || []) {
      parts.push(el("h3", {}, q.quantile_name));
      for (const ex of (q.examples || []).slice(0, 6)) parts.push(example(ex, d.act_max));
    }
    box.replaceChildren(...parts);
  }

  function histogram(counts) {
    const NS = "http://www.w3.org/2000/svg";
    const W = 300, H = 50;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "hist");
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    const max = Math.max(1, ...counts);
    const bw = W / Math.max(1, counts.length);
    counts.forEach((c, i) => {
      const h = (c / max) * (H - 2);
      const r = document.createElementNS(NS, "rect");
      r.setAttribute("x", (i * bw).toFixed(1));
      r.setAttribute("y", (H - h).toFixed(1));
      r.setAttribute("width", Math.max(1, bw - 1).toFixed(1));
      r.setAttribute("height", h.toFixed(1));
      svg.append(r);
    });
    return svg;
  }

  // One example context: token spans shaded by activation relative to the feature's max.
  function example(ex, actMax) {
    const acts = ex.tokens_acts_list || [];
    let arg = 0;
    acts.forEach((a, i) => { if (a > acts[arg]) arg = i; });
    const max = actMax || Math.max(1e-9, ...acts);
    const div = el("div", { class: "example" });
    (ex.tokens || []).forEach((t, i) => {
      const a = Math.max(0, acts[i] || 0);
      const span = el("span", { title: fmt(acts[i] || 0) }, t.replace(/\n/g, "↵"));
      span.style.backgroundColor = `rgba(255,152,0,${Math.min(1, a / max).toFixed(3)})`;
      if (i === arg && acts[i] > 0) span.classList.add("max");
      div.append(span, " ");
    });
    return div;
  }

  // ---------------------------------------------------------------- pins, supernodes, subgraph
  function togglePin() {
    const id = state.selected;
    if (!id) return;
    if (state.pinned.has(id)) state.pinned.delete(id); else state.pinned.add(id);
    afterPinChange();
  }

  function afterPinChange() {
    renderPinned();
    renderSupernodes();
    if (state.subgraph) updateVisibility();
    renderPanel();
    draw();
    writeHash();
  }

  function renderPinned() {
    $("#pinned").replaceChildren(...[...state.pinned].map((id) => {
      const n = state.byId.get(id);
      return el("li", { dataset: { nodeId: id }, title: id, onclick: () => selectNode(id) },
        el("button", { class: "remove", type: "button", title: "unpin", onclick: (e) => { e.stopPropagation(); state.pinned.delete(id); afterPinChange(); } }, "×"),
        n ? nodeLabel(n) : id);
    }));
  }

  function renderSupernodes() {
    $("#supernodes").replaceChildren(...state.supernodes.map((s, i) =>
      el("li", { dataset: { label: s.label }, title: s.ids.join(", ") },
        el("button", { class: "remove", type: "button", title: "ungroup", onclick: () => { state.supernodes.splice(i, 1); afterPinChange(); } }, "×"),
        `${s.label} (${s.ids.length})`)));
    renderIvTargets();
  }

  // Grouping moves the pinned nodes into a new supernode (they stay in the subgraph through it).
  function groupPinned() {
    if (!state.pinned.size) { showError("Pin some nodes before grouping."); return; }
    const label = $("#group-label").value.trim() || `group ${state.supernodes.length + 1}`;
    state.supernodes.push({ label, ids: [...state.pinned] });
    state.pinned.clear();
    $("#group-label").value = "";
    showError("");
    afterPinChange();
  }

  // ---------------------------------------------------------------- interventions + steering
  // Target options: the selected node, the pinned set, or one supernode (value "sn:<index>").
  function renderIvTargets() {
    const sel = $("#iv-target");
    const prev = sel.value;
    sel.replaceChildren(
      el("option", { value: "selected" }, "selected node"),
      el("option", { value: "pinned" }, "pinned nodes"),
      ...state.supernodes.map((s, i) => el("option", { value: `sn:${i}` }, s.label)));
    if ([...sel.options].some((o) => o.value === prev)) sel.value = prev;
  }

  function ivTargetIds() {
    const t = $("#iv-target").value;
    if (t === "selected") return state.selected ? [state.selected] : [];
    if (t === "pinned") return [...state.pinned];
    const s = state.supernodes[Number(t.slice(3))];
    return s ? s.ids : [];
  }

  // Prompt token ids (BOS included) from the embedding node ids "E_{tok}_{pos}", ordered by position.
  function promptTokenIds() {
    return state.nodes
      .filter((n) => n.feature_type === "embedding")
      .map((n) => n.node_id.split("_").slice(1).map(Number))
      .sort((a, b) => a[1] - b[1])
      .map(([tok]) => tok);
  }

  // Feature and error nodes become interventions at their own position; embeddings / logits are skipped.
  function ivRequest() {
    if (!state.graph) throw new Error("Load a graph first.");
    const ids = ivTargetIds();
    const op = $("#iv-op").value;
    const v = parseFloat($("#iv-value").value);
    const value = Number.isFinite(v) ? v : 0;
    const interventions = [];
    for (const id of ids) {
      const n = state.byId.get(id);
      if (!n) continue;
      const base = { layer: parseInt(n.layer, 10), op, value, positions: [n.ctx_idx] };
      if (n.feature_type === "cross layer transcoder") interventions.push({ ...base, feature: featureIndex(n) });
      else if (n.feature_type === "mlp reconstruction error") interventions.push({ ...base, feature: null });
    }
    if (!interventions.length) {
      throw new Error(ids.length ? "The target has no feature or error nodes (embeddings and logits cannot be intervened on)."
        : "No target nodes: select, pin or group some first.");
    }
    return { tokens: promptTokenIds(), interventions };
  }

  // Runs one intervention request; a newer request or graph load makes the reply stale.
  async function ivCall(url, extra, render) {
    showError("");
    const body = { ...ivRequest(), ...extra };
    const seq = ++state.ivSeq;
    const box = $("#iv-result");
    box.replaceChildren(el("p", { class: "muted" }, "running…"));
    for (const b of ["#iv-run", "#iv-steer"]) $(b).disabled = true;
    try {
      const r = await postJSON(url, body);
      if (seq === state.ivSeq) render(r, box);
    } catch (e) {
      if (seq === state.ivSeq) box.replaceChildren();
      throw e;
    } finally {
      if (seq === state.ivSeq) for (const b of ["#iv-run", "#iv-steer"]) $(b).disabled = false;
    }
  }

  function runIntervention() {
    return ivCall("/v1/interventions", { top_k: 10 }, (r, box) => {
      const after = new Map((r.top_after || []).map((t) => [t.token_id, t]));
      const before = new Map((r.top_before || []).map((t) => [t.token_id, t]));
      // Rows: the top tokens before, then any new ones after; "–" means outside that top k.
      const rows = [...(r.top_before || []), ...(r.top_after || []).filter((t) => !before.has(t.token_id))].map((t) => {
        const pb = before.get(t.token_id)?.prob, pa = after.get(t.token_id)?.prob;
        const dir = pb !== undefined && pa !== undefined ? (pa > pb ? "up" : pa < pb ? "down" : "") : "";
        return el("tr", { class: "iv-row", title: `token id ${t.token_id}` },
          el("td", { class: "tok" }, JSON.stringify(t.token)), el("td", {}, fmt(pb)), el("td", { class: dir }, fmt(pa)));
      });
      box.replaceChildren(el("table", {},
        el("thead", {}, el("tr", {}, el("th", {}, "token"), el("th", {}, "prob before"), el("th", {}, "prob after"))),
        el("tbody", {}, ...rows)));
    });
  }

  function runSteer() {
    const n = parseInt($("#iv-tokens").value, 10);
    return ivCall("/v1/steer", { max_new_tokens: Number.isFinite(n) ? n : 20 }, (r, box) => {
      box.replaceChildren(
        el("h3", {}, "plain"), el("div", { id: "iv-plain", class: "iv-text" }, r.plain ?? ""),
        el("h3", {}, "steered"), el("div", { id: "iv-steered", class: "iv-text" }, r.steered ?? ""));
    });
  }

  // ---------------------------------------------------------------- URL hash state
  // Format: #graph=<id>&pinned=a,b&supernodes=label:id1;id2|label2:...&threshold=0.80
  // Each label / id is URI-encoded on its own, so the separators ,;:| stay unambiguous.
  function writeHash() {
    if (!state.graphId) return;
    const enc = encodeURIComponent;
    const parts = [`graph=${enc(state.graphId)}`];
    if (state.pinned.size) parts.push(`pinned=${[...state.pinned].map(enc).join(",")}`);
    if (state.supernodes.length) parts.push(`supernodes=${state.supernodes.map((s) => `${enc(s.label)}:${s.ids.map(enc).join(";")}`).join("|")}`);
    parts.push(`threshold=${state.threshold.toFixed(2)}`);
    if (state.subgraph) parts.push("subgraph=1");
    history.replaceState(null, "", `#${parts.join("&")}`); // replaceState: no hashchange loop
  }

  function readHash() {
    const out = {};
    for (const kv of location.hash.replace(/^#/, "").split("&")) {
      const eq = kv.indexOf("=");
      if (eq > 0) out[kv.slice(0, eq)] = kv.slice(eq + 1);
    }
    const dec = (s) => { try { return decodeURIComponent(s); } catch (_) { return s; } };
    const split = (s, sep) => (s ? s.split(sep).filter(Boolean).map(dec) : []);
    const res = { graph: out.graph ? dec(out.graph) : null, pinned: split(out.pinned, ",") };
    res.supernodes = (out.supernodes ? out.supernodes.split("|") : []).filter(Boolean).map((item) => {
      const c = item.indexOf(":");
      return c < 0 ? { label: dec(item), ids: [] } : { label: dec(item.slice(0, c)), ids: split(item.slice(c + 1), ";") };
    });
    const th = parseFloat(out.threshold);
    if (Number.isFinite(th)) res.threshold = th;
    res.subgraph = out.subgraph === "1";
    return res;
  }

  async function openFromHash() {
    const h = readHash();
    if (!h.graph) return;
    state.subgraph = h.subgraph;
    $("#subgraph").checked = h.subgraph;
    await openGraph(h.graph, h);
  }

  // ---------------------------------------------------------------- downloads
  function baseName() { return `attribution-${state.graphId || "graph"}`; }

  function downloadSVG() {
    const b = graphBounds();
    const pad = 40;
    const vis = state.nodes.filter((n) => state.visible[n.idx]);
    let maxW = 0;
    for (const i of state.visibleLinks) maxW = Math.max(maxW, Math.abs(state.links[i].weight));
    const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
    const out = [`<svg xmlns="http://www.w3.org/2000/svg" viewBox="${b.x0 - pad} ${b.y0 - pad * 2} ${b.x1 - b.x0 + 2 * pad} ${b.y1 - b.y0 + pad * 3}">`,
      `<rect x="${b.x0 - pad}" y="${b.y0 - pad * 2}" width="100%" height="100%" fill="#fff"/>`, `<g fill="none">`];
    for (const i of state.visibleLinks) {
      const l = state.links[i], s = state.nodes[l.s], t = state.nodes[l.t];
      const rel = maxW ? Math.abs(l.weight) / maxW : 0;
      out.push(`<line x1="${s.x.toFixed(1)}" y1="${s.y.toFixed(1)}" x2="${t.x.toFixed(1)}" y2="${t.y.toFixed(1)}" stroke="${l.weight < 0 ? "#d32f2f" : "#1e64d2"}" stroke-opacity="${(0.15 + 0.6 * rel).toFixed(2)}" stroke-width="${(0.4 + 4 * rel).toFixed(2)}"/>`);
    }
    out.push("</g><g>");
    for (const n of vis) {
      const fill = COLORS[n.feature_type] || "#555";
      const title = `<title>${esc(nodeLabel(n))}</title>`;
      if (n.feature_type === "mlp reconstruction error") out.push(`<rect x="${(n.x - NODE_R).toFixed(1)}" y="${(n.y - NODE_R).toFixed(1)}" width="${2 * NODE_R}" height="${2 * NODE_R}" fill="${fill}">${title}</rect>`);
      else out.push(`<circle cx="${n.x.toFixed(1)}" cy="${n.y.toFixed(1)}" r="${n.feature_type === "cross layer transcoder" ? NODE_R : NODE_R + 2}" fill="${fill}"${state.pinned.has(n.node_id) ? ' stroke="#fbc02d" stroke-width="2"' : ""}>${title}</circle>`);
    }
    out.push(`</g><g font-family="sans-serif" font-size="11" text-anchor="middle">`);
    state.tokens.forEach((tok, i) => out.push(`<text x="${(state.colX[i] + state.colW[i] / 2).toFixed(1)}" y="${pad}">${esc(tok)}</text>`));
    for (const n of vis) if (n.feature_type === "logit") out.push(`<text x="${n.x.toFixed(1)}" y="${(n.y - 10).toFixed(1)}" transform="rotate(-45 ${n.x.toFixed(1)} ${(n.y - 10).toFixed(1)})" text-anchor="start">${esc(logitToken(n))} ${fmt(n.token_prob, 2)}</text>`);
    out.push("</g></svg>");
    download(new Blob([out.join("\n")], { type: "image/svg+xml" }), `${baseName()}.svg`);
  }

  function setupDownloads() {
    $("#download-json").addEventListener("click", () => {
      if (state.graph) download(new Blob([JSON.stringify(state.graph)], { type: "application/json" }), `${baseName()}.json`);
    });
    $("#download-msgpack").addEventListener("click", () => {
      if (state.msgpackBytes) download(new Blob([state.msgpackBytes], { type: "application/msgpack" }), `${baseName()}.msgpack`);
    });
    $("#download-png").addEventListener("click", () => {
      canvas.toBlob((blob) => { if (blob) download(blob, `${baseName()}.png`); else showError("PNG export failed"); }, "image/png");
    });
    $("#download-svg").addEventListener("click", () => { if (state.graph) downloadSVG(); });
  }

  // ---------------------------------------------------------------- test hooks
  window.__graphReady = false;
  window.__graphStats = { nodes: 0, edges: 0 };
  window.__selectNode = (id) => selectNode(id);
  // Screen position (CSS px, relative to the canvas) of a node, for pixel-level click tests.
  window.__nodeScreenPos = (id) => {
    const n = state.byId.get(id);
    return n ? { x: state.view.x + n.x * state.view.k, y: state.view.y + n.y * state.view.k } : null;
  };
  window.__nodes = () => state.nodes
    .filter((n) => state.visible[n.idx])
    .map((n) => ({ id: n.node_id, node_id: n.node_id, type: n.feature_type, feature_type: n.feature_type,
      layer: n.layer, ctx_idx: n.ctx_idx, feature: n.feature, influence: n.influence }));

  // ---------------------------------------------------------------- wiring
  function init() {
    $("#form").addEventListener("submit", (e) => { e.preventDefault(); safe(runPrompt)(); });
    $("#prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); safe(runPrompt)(); }
    });
    $("#cancel").addEventListener("click", safe(cancelJob));
    $("#node-threshold").addEventListener("input", (e) => setThreshold(e.target.value));
    $("#subgraph").addEventListener("change", (e) => {
      state.subgraph = e.target.checked;
      if (state.graph) { updateVisibility(); draw(); renderPanel(); writeHash(); }
    });
    $("#fit").addEventListener("click", () => { fitView(); draw(); });
    $("#pin").addEventListener("click", togglePin);
    $("#group").addEventListener("click", groupPinned);
    $("#group-label").addEventListener("keydown", (e) => { if (e.key === "Enter") groupPinned(); });
    $("#iv-run").addEventListener("click", safe(runIntervention));
    $("#iv-steer").addEventListener("click", safe(runSteer));
    renderIvTargets();
    window.addEventListener("hashchange", safe(() => {
      const h = readHash();
      if (h.graph && h.graph !== state.graphId) return openGraph(h.graph, h);
    }));
    setupCanvasEvents();
    setupDownloads();
    new ResizeObserver(resizeCanvas).observe($("#canvas-wrap"));
    resizeCanvas();
    const h = readHash();
    if (h.threshold !== undefined) setThreshold(h.threshold, false);
    // Model info first (layer count, defaults), then the graph from the hash, then the recent list.
    safe(async () => {
      await loadModels().catch((e) => showError(`models: ${e.message}`));
      await Promise.all([openFromHash(), loadRecent()]);
    })();
  }

  init();
})();
