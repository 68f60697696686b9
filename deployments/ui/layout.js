// Where every drawn node of the graph view goes, in CSS pixels of the graph area. Pure: no DOM.
//
// Columns are token positions, rows are layers (tokens at the bottom, logits on top); only layers that hold a
// drawn node get a row. Columns share the full width: each gets what its busiest cell needs, the rest is
// shared equally. Inside a cell nodes sit side by side, wrapping onto more lines when the column is narrow;
// the node radius shrinks until every cell fits, so no two nodes overlap. Logits (all at the last position)
// get a row of equal slots across the whole width, so their labels (token and probability) never overlap; the
// most probable is on the right, nearest the last position.
import { ERROR, FEATURE, LOGIT, TOKEN } from "./graph-model.js";

export const MARGIN = { left: 46, right: 14, top: 8, bottom: 10 };
export const TOKEN_LABEL_H = 30;   // px under the token row
export const LOGIT_LABEL_H = 30;   // px of label above each logit node: token, then probability
const LOGIT_LINE_H = LOGIT_LABEL_H + 16; // a line of logits: label, node and the gap to the next line's label
const LOGIT_SLOT_MIN = 70;         // px: narrower slots wrap the logits onto another line
const GAP = 3;                     // px between node circles
const R_MAX = 6, R_MIN = 1.5;

/**
 * layoutGraph(g, p, {width, height, showErrors}) -> {
 *   nodes: Int32Array (drawn node indices), x, y: Float32Array [N], r,
 *   rows: [{layer, y, label}], columns: [{pos, x0, x1}], logitSlots: [{i, x0, x1, y}], plot: {x0, x1, top, bottom}}
 */
export function layoutGraph(g, p, { width, height, showErrors = true }) {
  const drawn = [];
  for (let i = 0; i < g.N; i++) {
    if (p.shown[i] && (showErrors || g.type[i] !== ERROR)) drawn.push(i);
  }
  const nodes = Int32Array.from(drawn);
  const x = new Float32Array(g.N).fill(NaN), y = new Float32Array(g.N).fill(NaN);
  const x0 = MARGIN.left, x1 = Math.max(x0 + 10, width - MARGIN.right), plotW = x1 - x0;

  // logits: equal slots, wrapping onto lines of at most perLine
  const logits = drawn.filter((i) => g.type[i] === LOGIT).sort((a, b) => g.logitProb[b - g.logitOffset] - g.logitProb[a - g.logitOffset]);
  const perLine = Math.max(1, Math.min(logits.length, Math.floor(plotW / LOGIT_SLOT_MIN)));
  const logitLines = Math.max(1, Math.ceil(logits.length / perLine));
  const top = MARGIN.top + (logitLines - 1) * LOGIT_LINE_H + LOGIT_LABEL_H + 10;
  const bottom = Math.max(top + 40, height - MARGIN.bottom - TOKEN_LABEL_H);

  // rows: tokens, layers with drawn features/errors, logits
  const layers = [...new Set(drawn.filter((i) => g.type[i] === FEATURE || g.type[i] === ERROR).map((i) => g.layer[i]))].sort((a, b) => a - b);
  const rowLayers = [-1, ...layers, g.L];
  const rowH = (bottom - top) / Math.max(1, rowLayers.length - 1);
  const rowY = new Map(rowLayers.map((l, j) => [l, bottom - j * rowH]));
  const rows = rowLayers.map((l) => ({ layer: l, y: rowY.get(l), label: l < 0 ? "Emb" : l === g.L ? "Out" : `L${l}` }));

  // cells (layer, position) of features and errors, most influential first
  const cells = new Map();
  for (const i of drawn) {
    if (g.type[i] !== FEATURE && g.type[i] !== ERROR) continue;
    const key = g.layer[i] * g.T + g.pos[i];
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(i);
  }
  const busiest = new Array(g.T).fill(1);
  for (const list of cells.values()) busiest[g.pos[list[0]]] = Math.max(busiest[g.pos[list[0]]], list.length);

  // column widths: need, then share what is left equally (or shrink proportionally)
  const minCol = Math.min(48, plotW / g.T);
  const need = busiest.map((n) => Math.max(minCol, n * (2 * R_MAX + GAP) + 8));
  const total = need.reduce((s, w) => s + w, 0);
  const widths = total <= plotW ? need.map((w) => w + (plotW - total) / g.T) : need.map((w) => (w * plotW) / total);
  const columns = [];
  let cx = x0;
  for (let pos = 0; pos < g.T; pos++) {
    columns.push({ pos, x0: cx, x1: cx + widths[pos] });
    cx += widths[pos];
  }

  // the largest radius with which every cell fits its column width and row height
  const fits = (r) => {
    const pitch = 2 * r + GAP;
    for (const list of cells.values()) {
      const w = widths[g.pos[list[0]]] - 4;
      const per = Math.floor(w / pitch);
      if (per < 1 || Math.ceil(list.length / per) * pitch > rowH) return false;
    }
    return 2 * r + GAP <= rowH && 2 * r + GAP <= Math.min(...widths);
  };
  let r = R_MAX;
  while (r > R_MIN && !fits(r)) r -= 0.25;
  const pitch = 2 * r + GAP;

  for (const list of cells.values()) {
    list.sort((a, b) => p.cumulative[a] - p.cumulative[b] || a - b);
    const col = columns[g.pos[list[0]]], w = col.x1 - col.x0 - 4;
    const per = Math.max(1, Math.floor(w / pitch)), lines = Math.ceil(list.length / per);
    const yc = rowY.get(g.layer[list[0]]);
    list.forEach((i, j) => {
      const line = Math.floor(j / per), inLine = Math.min(per, list.length - line * per);
      const step = Math.min(w / inLine, pitch * 2.2); // spread out, but keep a cell's nodes together
      x[i] = (col.x0 + col.x1) / 2 + (j % per - (inLine - 1) / 2) * step;
      y[i] = yc + (line - (lines - 1) / 2) * pitch;
    });
  }
  for (const i of drawn) {
    if (g.type[i] === TOKEN) { x[i] = (columns[g.pos[i]].x0 + columns[g.pos[i]].x1) / 2; y[i] = bottom; }
  }
  const slotW = plotW / perLine;
  const logitSlots = logits.map((i, j) => {
    const line = Math.floor(j / perLine), inLine = Math.min(perLine, logits.length - line * perLine);
    const sx0 = x1 - (plotW - inLine * slotW) / 2 - (j % perLine + 1) * slotW; // most probable on the right, above the last token
    x[i] = sx0 + slotW / 2;
    y[i] = top - line * LOGIT_LINE_H;
    return { i, x0: sx0, x1: sx0 + slotW, y: y[i] };
  });
  return { nodes, x, y, r, rows, columns, logitSlots, plot: { x0, x1, top, bottom } };
}
