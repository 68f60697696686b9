// The subgraph view (SVG): pinned nodes and supernodes, laid out by layer (rows) and token position (columns).
//
// A unit is an ungrouped pinned node or a supernode; a supernode is a box listing its members. Units of one row
// are spread so none overlap. Layers: cards, then edges, then dots and labels (with a white halo), so every edge
// stays visible and no label is hidden by one. An edge leaves its source's top and enters its target's bottom at
// its own port (ports ordered by the other end's x, so edges do not cross at the card); its weight is the sum of
// the direct effects A[target, source] (unpruned graph) from every member of one unit to every member of the other.
import { el, fmt } from "./dom.js";
import { COLORS } from "./graph-view.js";
import { directEffect } from "./graph-model.js";

const NODE_W = 150, NODE_H = 44, SUPER_W = 190, HEAD_H = 24, MEMBER_H = 18, ROW_GAP = 56, COL_GAP = 18, CHAR_W = 6.3;

const clip = (s, w) => (s.length * CHAR_W <= w ? s : `${s.slice(0, Math.max(1, Math.floor(w / CHAR_W) - 1))}…`);

/**
 * Draw into `svg`. opts: {g, pins: [node], supernodes: [{label, members: [node]}], selected, label(i), where(i),
 * onSelect(i), width, height}. Returns the number of units drawn.
 */
export function renderSubgraph(svg, opts) {
  const { g, label, where, onSelect } = opts;
  const units = [
    ...opts.supernodes.filter((s) => s.members.length).map((s) => ({ kind: "super", label: s.label, members: s.members })),
    ...opts.pins.map((i) => ({ kind: "node", label: label(i), members: [i] })),
  ];
  if (!units.length) {
    svg.replaceChildren();
    svg.setAttribute("viewBox", `0 0 ${opts.width} ${opts.height}`);
    svg.append(el("text", { x: opts.width / 2, y: opts.height / 2, "text-anchor": "middle", class: "sg-empty" },
      "Pin nodes (select one, then Pin) to build a subgraph; group pinned nodes into supernodes."));
    return 0;
  }
  const mean = (xs) => xs.reduce((s, v) => s + v, 0) / xs.length;
  for (const u of units) {
    u.layer = Math.round(mean(u.members.map((i) => g.layer[i])));
    u.pos = mean(u.members.map((i) => g.pos[i]));
    u.w = u.kind === "super" ? SUPER_W : NODE_W;
    u.h = u.kind === "super" ? HEAD_H + u.members.length * MEMBER_H + 6 : NODE_H;
    if (u.kind === "super") u.members.sort((a, b) => g.layer[a] - g.layer[b] || g.pos[a] - g.pos[b]);
  }

  // rows bottom-up by layer; columns by position; then push apart within a row
  const layers = [...new Set(units.map((u) => u.layer))].sort((a, b) => a - b);
  const positions = [...new Set(units.map((u) => u.pos))].sort((a, b) => a - b);
  const colW = Math.max(NODE_W + COL_GAP, (opts.width - 40) / positions.length);
  let y = 0;
  const rowTop = new Map();
  for (const l of layers) {
    const h = Math.max(...units.filter((u) => u.layer === l).map((u) => u.h));
    rowTop.set(l, { h });
  }
  for (const l of [...layers].reverse()) { rowTop.get(l).y = y; y += rowTop.get(l).h + ROW_GAP; }
  const height = y - ROW_GAP;
  let minX = Infinity, maxX = -Infinity;
  for (const l of layers) {
    const row = units.filter((u) => u.layer === l).sort((a, b) => a.pos - b.pos);
    let right = -Infinity;
    for (const u of row) {
      const ideal = 20 + (positions.indexOf(u.pos) + 0.5) * colW - u.w / 2;
      u.x = Math.max(ideal, right + COL_GAP);
      right = u.x + u.w;
      const { y: top, h } = rowTop.get(l);
      u.y = top + (h - u.h) / 2;
      minX = Math.min(minX, u.x); maxX = Math.max(maxX, right);
    }
  }

  // member circle centres
  const at = new Map();
  for (const u of units) {
    if (u.kind === "node") at.set(u.members[0], { x: u.x + u.w / 2, y: u.y + 12 });
    else u.members.forEach((i, j) => at.set(i, { x: u.x + 14, y: u.y + HEAD_H + j * MEMBER_H + MEMBER_H / 2 }));
  }

  // summed edges between units
  const edges = [];
  for (const s of units) {
    for (const t of units) {
      if (s === t) continue;
      let w = 0;
      for (const a of s.members) for (const b of t.members) w += directEffect(g, b, a);
      if (w !== 0) edges.push({ s, t, w });
    }
  }
  const maxW = Math.max(1e-12, ...edges.map((e) => Math.abs(e.w)));
  const port = (u, list, other) => { // x of each edge's end on unit u, spread over the middle of its width
    list.sort((a, b) => other(a).x + other(a).w / 2 - (other(b).x + other(b).w / 2));
    list.forEach((e, j) => { e[u === e.s ? "x1" : "x2"] = u.x + u.w * (list.length === 1 ? 0.5 : 0.2 + (0.6 * j) / (list.length - 1)); });
  };
  for (const u of units) {
    port(u, edges.filter((e) => e.s === u), (e) => e.t);
    port(u, edges.filter((e) => e.t === u), (e) => e.s);
  }
  const edgeLayer = el("g", { class: "sg-edges" });
  for (const { s, t, w, x1, x2 } of edges) {
    const y1 = s.y, y2 = t.y + t.h; // from the source's top to the target's bottom
    const rel = Math.abs(w) / maxW, mid = (y1 + y2) / 2;
    edgeLayer.append(el("path", {
      d: `M${x1},${y1} C${x1},${mid} ${x2},${mid} ${x2},${y2}`, fill: "none",
      stroke: w < 0 ? "#d32f2f" : "#1e64d2", "stroke-width": (0.8 + 6 * rel).toFixed(2), "stroke-opacity": (0.3 + 0.6 * rel).toFixed(2),
      class: "sg-edge",
    }, el("title", {}, `${s.label} → ${t.label}: ${fmt(w, 4)}`)));
  }

  const cardLayer = el("g", { class: "sg-cards" }), unitLayer = el("g", { class: "sg-units" });
  const dot = (i, x, yy, r, cls) => el("circle", {
    cx: x, cy: yy, r, fill: COLORS[g.type[i]], class: `${cls}${i === opts.selected ? " selected" : ""}`,
    dataset: { nodeId: g.ids[i] }, onclick: () => onSelect(i),
  }, el("title", {}, `${label(i)} — ${where(i)}`));
  for (const u of units) {
    if (u.kind === "node") {
      const i = u.members[0], c = at.get(i);
      cardLayer.append(el("rect", { x: u.x, y: u.y, width: u.w, height: u.h, rx: 6, class: "sg-card", dataset: { nodeId: g.ids[i] } }));
      unitLayer.append(el("g", { class: "sg-node", dataset: { nodeId: g.ids[i] } },
        dot(i, c.x, c.y, 7, "sg-dot"),
        el("text", { x: c.x, y: u.y + 30, "text-anchor": "middle", class: "sg-label" }, clip(u.label, u.w - 8)),
        el("text", { x: c.x, y: u.y + 41, "text-anchor": "middle", class: "sg-where" }, clip(where(i), u.w - 8))));
    } else {
      cardLayer.append(el("rect", { x: u.x, y: u.y, width: u.w, height: u.h, rx: 6, class: "sg-box", dataset: { label: u.label } }));
      const box = el("g", { class: "sg-super", dataset: { label: u.label } },
        el("text", { x: u.x + 8, y: u.y + 16, class: "sg-head" }, clip(u.label, u.w - 16)));
      for (const i of u.members) {
        const c = at.get(i);
        box.append(dot(i, c.x, c.y, 5, "sg-member"),
          el("text", { x: c.x + 10, y: c.y + 4, class: "sg-label small" }, clip(label(i), u.w - 32)));
      }
      unitLayer.append(box);
    }
  }
  const pad = 16, vw = Math.max(opts.width, maxX - minX + 2 * pad), vh = Math.max(opts.height, height + 2 * pad);
  svg.setAttribute("viewBox", `${(minX + maxX) / 2 - vw / 2} ${height / 2 - vh / 2} ${vw} ${vh}`);
  svg.replaceChildren(cardLayer, edgeLayer, unitLayer);
  return units.length;
}

/** The drawn subgraph as a standalone SVG file (its .sg-* styles inlined). */
export function subgraphSvgBlob(svg) {
  const copy = svg.cloneNode(true);
  copy.setAttribute("xmlns", "http://www.w3.org/2000/svg");
  const css = [...document.styleSheets].flatMap((s) => [...s.cssRules]).map((r) => r.cssText).filter((t) => t.includes(".sg-"));
  const text = new XMLSerializer().serializeToString(copy).replace(/(<svg[^>]*>)/, `$1<style>${css.join("\n")}</style>`);
  return new Blob([text], { type: "image/svg+xml" });
}
