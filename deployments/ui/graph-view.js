// The graph view: nodes and edges on a canvas, token / logit / layer labels as HTML over it, a hover tooltip.
//
// By default only the edges of the hovered node (else the selected one) and the edges among pinned nodes are drawn;
// `allEdges` adds every edge of the pruned graph underneath (cached in an offscreen layer, so hovering stays
// cheap). Edge colour is the sign of the weight (blue +, red −), width and opacity its |weight|.
import { el, pct, showToken } from "./dom.js";
import { ERROR, FEATURE, LOGIT, TOKEN, incoming, outgoing } from "./graph-model.js";
import { LOGIT_LABEL_H, TOKEN_LABEL_H, layoutGraph } from "./layout.js";

export const COLORS = { [FEATURE]: "#e8833a", [ERROR]: "#9e9e9e", [TOKEN]: "#4e8f4a", [LOGIT]: "#7e57c2" };
const POS = [30, 100, 210], NEG = [211, 47, 47]; // edge colours (rgb)
const BUCKETS = 6;

export class GraphView {
  /** wrap: the element holding canvas#graph; hooks: {onSelect(i|null), onHover(i|null), label(i), where(i)}. */
  constructor(wrap, hooks) {
    this.wrap = wrap;
    this.hooks = hooks;
    this.canvas = wrap.querySelector("canvas");
    this.ctx = this.canvas.getContext("2d");
    this.labels = el("div", { class: "graph-labels" });
    this.tip = el("div", { class: "tooltip", hidden: true });
    wrap.append(this.labels, this.tip);
    this.g = null; this.p = null; this.lay = null; this.base = null;
    this.opts = { showErrors: true, allEdges: false };
    this.focus = { selected: null, pinned: new Set(), grouped: new Set() };
    this.hovered = null;
    this.drawnEdges = 0;
    this.canvas.addEventListener("mousemove", (e) => this.#move(e));
    this.canvas.addEventListener("mouseleave", () => this.#hover(null));
    this.canvas.addEventListener("click", (e) => this.hooks.onSelect(this.#hit(e)));
  }

  /** A new graph or pruning (p from pruneGraph); opts: {showErrors, allEdges}. */
  set(g, p, opts = {}) {
    this.g = g; this.p = p;
    Object.assign(this.opts, opts);
    this.hovered = null;
    this.relayout();
  }

  setFocus(focus) {
    Object.assign(this.focus, focus);
    this.draw();
  }

  relayout() {
    const { width, height } = this.#size();
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.max(1, Math.round(width * dpr));
    this.canvas.height = Math.max(1, Math.round(height * dpr));
    if (!this.g) { this.labels.replaceChildren(); this.draw(); return; }
    this.lay = layoutGraph(this.g, this.p, { width, height, showErrors: this.opts.showErrors });
    this.drawn = new Uint8Array(this.g.N);
    for (const i of this.lay.nodes) this.drawn[i] = 1;
    this.#renderLabels();
    this.base = null;
    this.draw();
  }

  #size() {
    const r = this.wrap.getBoundingClientRect();
    return { width: Math.max(200, r.width), height: Math.max(200, r.height) };
  }

  // ---- drawing
  draw() {
    const c = this.ctx, dpr = window.devicePixelRatio || 1;
    c.setTransform(1, 0, 0, 1, 0, 0);
    c.clearRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.g) return;
    if (!this.base) this.base = this.#baseLayer(dpr);
    c.drawImage(this.base.canvas, 0, 0);
    c.setTransform(dpr, 0, 0, dpr, 0, 0);
    const focusEdges = this.#focusEdges();
    this.#strokeEdges(c, focusEdges, 0.15, 0.9, 0.6, 5);
    this.drawnEdges = this.opts.allEdges ? this.base.count : focusEdges.length; // focus edges are among all edges
    this.#drawNodes(c, focusEdges);
  }

  // Grid and (with allEdges) every edge: redrawn only when the layout or options change.
  #baseLayer(dpr) {
    const canvas = document.createElement("canvas");
    canvas.width = this.canvas.width; canvas.height = this.canvas.height;
    const c = canvas.getContext("2d");
    c.setTransform(dpr, 0, 0, dpr, 0, 0);
    const { columns, rows, plot } = this.lay;
    columns.forEach((col, j) => {
      c.fillStyle = j % 2 ? "#f7f8fa" : "#ffffff";
      c.fillRect(col.x0, plot.top - 12, col.x1 - col.x0, plot.bottom - plot.top + 24);
    });
    c.strokeStyle = "#e6e8eb";
    c.lineWidth = 1;
    for (const row of rows) {
      c.beginPath(); c.moveTo(plot.x0, row.y); c.lineTo(plot.x1, row.y); c.stroke();
    }
    let count = 0;
    if (this.opts.allEdges) {
      const all = [];
      for (let e = 0; e < this.p.E; e++) if (this.drawn[this.p.edges.src[e]] && this.drawn[this.p.edges.dst[e]]) all.push(e);
      this.#strokeEdges(c, all, 0.08, 0.5, 0.4, 2.5);
      count = all.length;
    }
    return { canvas, count };
  }

  // The node in focus: the hovered one (a preview), else the selected one.
  #active() {
    return this.hovered ?? this.focus.selected ?? null;
  }

  // Edges of the node in focus and edges between pinned nodes; only those with both ends drawn.
  #focusEdges() {
    const { p, drawn } = this, set = new Set(), i = this.#active();
    if (i !== null) {
      for (const e of incoming(p, i)) set.add(e);
      for (const e of outgoing(p, i)) set.add(e);
    }
    for (const i of this.focus.pinned) for (const e of outgoing(p, i)) if (this.focus.pinned.has(p.edges.dst[e])) set.add(e);
    return [...set].filter((e) => drawn[p.edges.src[e]] && drawn[p.edges.dst[e]]);
  }

  // One path per (sign, |weight| bucket): thousands of strokes become a dozen.
  #strokeEdges(c, list, a0, a1, w0, w1) {
    if (!list.length) return;
    const { x, y } = this.lay, { src, dst, weight } = this.p.edges;
    let max = 0;
    for (const e of list) max = Math.max(max, Math.abs(weight[e]));
    const paths = Array.from({ length: 2 * BUCKETS }, () => new Path2D());
    for (const e of list) {
      const b = Math.min(BUCKETS - 1, Math.floor(Math.sqrt(Math.abs(weight[e]) / max) * BUCKETS));
      const path = paths[(weight[e] < 0 ? BUCKETS : 0) + b];
      path.moveTo(x[src[e]], y[src[e]]);
      path.lineTo(x[dst[e]], y[dst[e]]);
    }
    paths.forEach((path, j) => {
      const f = ((j % BUCKETS) + 1) / BUCKETS;
      const [r, g, b] = j >= BUCKETS ? NEG : POS;
      c.strokeStyle = `rgba(${r},${g},${b},${(a0 + (a1 - a0) * f).toFixed(3)})`;
      c.lineWidth = w0 + (w1 - w0) * f * f;
      c.stroke(path);
    });
  }

  #drawNodes(c, focusEdges) {
    const { x, y, r, nodes } = this.lay, g = this.g, f = this.focus;
    const active = this.#active();
    let near = null;
    if (active !== null) {
      near = new Set([active, ...f.pinned]);
      for (const e of focusEdges) { near.add(this.p.edges.src[e]); near.add(this.p.edges.dst[e]); }
    }
    const paths = new Map(); // one path per (type, dimmed): a handful of fills for thousands of nodes
    for (const i of nodes) {
      const key = 2 * g.type[i] + (near && !near.has(i) ? 1 : 0);
      if (!paths.has(key)) paths.set(key, new Path2D());
      const path = paths.get(key);
      if (g.type[i] === ERROR) path.rect(x[i] - r * 0.85, y[i] - r * 0.85, 1.7 * r, 1.7 * r);
      else { path.moveTo(x[i] + r, y[i]); path.arc(x[i], y[i], r, 0, 2 * Math.PI); }
    }
    for (const [key, path] of paths) {
      c.globalAlpha = key % 2 ? 0.3 : 1;
      c.fillStyle = COLORS[key >> 1];
      c.fill(path);
    }
    c.globalAlpha = 1;
    const ring = (i, color, width, extra) => {
      if (i === null || i === undefined || !this.drawn[i]) return;
      c.strokeStyle = color; c.lineWidth = width;
      c.beginPath(); c.arc(x[i], y[i], r + extra, 0, 2 * Math.PI); c.stroke();
    };
    for (const i of f.grouped) ring(i, "#00897b", 2, 1.5);
    for (const i of f.pinned) ring(i, "#f9a825", 2.5, 1.5);
    ring(this.hovered, "#555", 1.5, 3);
    ring(f.selected, "#111", 2, 3.5);
  }

  // ---- labels (HTML, so they stay crisp and never overlap: each lives inside its own column or slot)
  #renderLabels() {
    const { g, lay } = this, items = [];
    for (const row of lay.rows) {
      items.push(el("div", { class: "layer-label", style: { top: `${row.y - 8}px` } }, row.label));
    }
    for (const col of lay.columns) {
      const tok = g.tokens[col.pos], w = col.x1 - col.x0 - 4;
      items.push(el("div", {
        class: `token-label${g.special[col.pos] ? " special" : ""}${w < 26 ? " narrow" : ""}`,
        title: `position ${col.pos}: ${JSON.stringify(tok)}${g.special[col.pos] ? " (special token)" : ""}`,
        dataset: { pos: col.pos },
        style: { left: `${col.x0 + 2}px`, width: `${w}px`, top: `${lay.plot.bottom + lay.r + 6}px`, height: `${TOKEN_LABEL_H - 6}px` },
      }, showToken(tok)));
    }
    for (const s of lay.logitSlots) {
      const k = s.i - g.logitOffset;
      items.push(el("div", {
        class: "logit-label", dataset: { nodeId: g.ids[s.i] },
        title: `output ${JSON.stringify(g.logitToken[k])}, probability ${g.logitProb[k].toFixed(4)}`,
        style: { left: `${s.x0 + 3}px`, width: `${s.x1 - s.x0 - 6}px`, top: `${s.y - lay.r - 4 - LOGIT_LABEL_H}px`, height: `${LOGIT_LABEL_H}px` },
      }, el("span", { class: "tok" }, showToken(g.logitToken[k])), el("span", { class: "prob" }, pct(g.logitProb[k]))));
    }
    this.labels.replaceChildren(...items);
  }

  // ---- interaction
  #hit(e) {
    if (!this.lay) return null;
    const rect = this.canvas.getBoundingClientRect();
    const px = e.clientX - rect.left, py = e.clientY - rect.top;
    const { x, y, r, nodes } = this.lay;
    let best = null, bestD = (r + 4) ** 2;
    for (const i of nodes) {
      const d = (x[i] - px) ** 2 + (y[i] - py) ** 2;
      if (d <= bestD) { best = i; bestD = d; }
    }
    return best;
  }

  #move(e) {
    const i = this.#hit(e);
    this.#hover(i);
    if (i !== null) this.#placeTip(e);
  }

  #hover(i) {
    if (i === this.hovered) return;
    this.hovered = i;
    this.canvas.style.cursor = i === null ? "default" : "pointer";
    this.hooks.onHover(i);
    this.updateTip();
    this.draw();
  }

  /** Refresh the tooltip text (e.g. when a hovered feature's dashboard arrives with its label). */
  updateTip() {
    const i = this.hovered;
    this.tip.hidden = i === null;
    if (i === null) return;
    const g = this.g, p = this.p;
    const rows = [el("b", {}, this.hooks.label(i)), el("div", { class: "muted" }, this.hooks.where(i))];
    if (g.type[i] === FEATURE || g.type[i] === ERROR) {
      rows.push(el("div", {}, `influence ${pct(p.share[i])}`, el("span", { class: "muted" }, " of the logits' attribution")));
    }
    if (g.type[i] === FEATURE) rows.push(el("div", {}, `activation ${g.featAct[i].toFixed(3)}`));
    this.tip.replaceChildren(...rows);
  }

  #placeTip(e) {
    const rect = this.wrap.getBoundingClientRect();
    const px = e.clientX - rect.left, py = e.clientY - rect.top;
    const w = this.tip.offsetWidth, h = this.tip.offsetHeight;
    this.tip.style.left = `${Math.min(px + 14, rect.width - w - 4)}px`;
    this.tip.style.top = `${py + 16 + h > rect.height ? py - h - 10 : py + 16}px`;
  }

  // ---- geometry for tests and exports
  /** Drawn nodes (circle centre and radius), label boxes and the number of edges drawn; page (CSS px) coordinates. */
  geometry() {
    if (!this.lay) return null;
    const rect = this.canvas.getBoundingClientRect(), { x, y, r } = this.lay;
    const box = (e) => { const b = e.getBoundingClientRect(); return { x: b.x, y: b.y, width: b.width, height: b.height }; };
    return {
      nodes: [...this.lay.nodes].map((i) => ({ id: this.g.ids[i], type: this.g.type[i], x: rect.x + x[i], y: rect.y + y[i], r })),
      edges: this.drawnEdges,
      tokenLabels: [...this.labels.querySelectorAll(".token-label")].map((e) => ({ text: e.textContent, special: e.classList.contains("special"), box: box(e) })),
      logitLabels: [...this.labels.querySelectorAll(".logit-label")].map((e) => ({ id: e.dataset.nodeId, text: e.textContent, box: box(e) })),
    };
  }

  /** The view as PNG: the canvas plus its HTML labels painted on. */
  pngBlob() {
    const out = document.createElement("canvas");
    out.width = this.canvas.width; out.height = this.canvas.height;
    const c = out.getContext("2d"), dpr = window.devicePixelRatio || 1, rect = this.canvas.getBoundingClientRect();
    c.fillStyle = "#fff"; c.fillRect(0, 0, out.width, out.height);
    c.drawImage(this.canvas, 0, 0);
    c.setTransform(dpr, 0, 0, dpr, 0, 0);
    c.font = "12px system-ui, sans-serif"; c.textAlign = "center"; c.textBaseline = "top";
    for (const e of this.labels.children) {
      const b = e.getBoundingClientRect();
      c.fillStyle = e.classList.contains("special") ? "#999" : "#333";
      c.fillText(e.innerText.replace(/\n/g, " "), b.x - rect.x + b.width / 2, b.y - rect.y + 2, b.width);
    }
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }
}
