// msgpack bytes -> the graph model the views draw; client-side pruning through ./prune.js.
//
// Node order (docs/method.md §5), N = nSel + (L+1)·T + K:
//   [features 0..nSel | errors nSel + l·T + p | tokens nSel + L·T + p | logits nSel + (L+1)·T + k]
// Stored rows (the masked `rows` array, [R = nSel + K, N]) are the features' rows, then the logits'.
// Node ids are the Neuronpedia JSON's (attribute_ray/neuronpedia.py), so pins and selections in the URL
// name the same nodes as the JSON download: feature "{layer}_{feature}_{pos}", error "{layer}_-1_{pos}",
// token "E_{tokenId}_{pos}", logit "{L+1}_{tokenId}_{T-1}".
import { csrFromMasked, prune } from "./prune.js";

export const FEATURE = 0, ERROR = 1, TOKEN = 2, LOGIT = 3;
export const TYPE_NAMES = ["feature", "error", "token", "logit"];

const FORMAT = "attribute-ray.graph", VERSION = 1;
// Tokenizer specials when the header has no `special_positions` (older graphs).
const SPECIAL_RE = /^(<\|[^|]*\|>|<\/?s>|<(bos|eos|pad|unk|mask|cls|sep)>|\[(CLS|SEP|PAD|BOS|EOS)\])$/i;

function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * 2 ** -14 * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * 2 ** (e - 15) * (1 + f / 1024);
}

/** {dtype, shape, data} (little-endian bytes) -> a typed array; int64 becomes Int32Array (indices, token ids). */
function typed(d, name) {
  const buf = d.data.slice().buffer; // an aligned copy: msgpack's views sit at arbitrary offsets
  switch (d.dtype) {
    case "<f4": return new Float32Array(buf);
    case "<i4": return new Int32Array(buf);
    case "<i8": return Int32Array.from(new BigInt64Array(buf), Number);
    case "<u2": return new Uint16Array(buf);
    case "|b1": return new Uint8Array(buf);
    case "<f2": return Float32Array.from(new Uint16Array(buf), halfToFloat);
    default: throw new Error(`graph array ${name}: dtype ${d.dtype} is not supported`);
  }
}

/** Decode a graph's msgpack bytes (docs/formats.md §h) into the model every view reads. */
export function decodeGraph(bytes) {
  const o = globalThis.MessagePack.decode(bytes);
  if (!o || o.format !== FORMAT) throw new Error("not an attribute-ray graph");
  if (o.version !== VERSION) throw new Error(`graph wire version ${o.version} is not supported (UI reads ${VERSION})`);
  const a = o.arrays;
  const active = typed(a.active_features, "active_features"); // [n_active, 3] (layer, pos, feature)
  const acts = typed(a.activation_values, "activation_values");
  const selected = typed(a.selected_features, "selected_features");
  const inputTokens = typed(a.input_tokens, "input_tokens");
  const logitProb = Float32Array.from(typed(a.logit_probabilities, "logit_probabilities"));
  const L = o.n_layers, T = inputTokens.length, nSel = selected.length, K = o.logit_targets.length;
  const N = nSel + (L + 1) * T + K;
  const rows = a.rows;
  if (!rows.masked) throw new Error("graph rows are not in the masked wire layout");
  const [R, cols] = rows.shape;
  if (R !== nSel + K || cols !== N) throw new Error(`rows shape [${R}, ${cols}] does not match the node counts`);

  const g = {
    prompt: o.prompt, model: o.model, transcoder: o.transcoder, settings: o.settings || {}, scores: o.scores || {},
    L, T, K, nSel, N, R, errorOffset: nSel, tokenOffset: nSel + L * T, logitOffset: nSel + (L + 1) * T,
    inputTokens, tokens: (o.prompt_tokens || []).map(String),
    featLayer: new Int32Array(nSel), featPos: new Int32Array(nSel), featIndex: new Int32Array(nSel),
    featAct: new Float32Array(nSel), featLabel: new Array(nSel).fill(""),
    logitToken: o.logit_targets.map((t) => String(t[0])), logitId: Int32Array.from(o.logit_targets, (t) => t[1]),
    logitProb,
    rowNodes: new Int32Array(R),
    csr: csrFromMasked(rows.mask, typed(rows.values, "rows"), R, N),
    type: new Uint8Array(N), layer: new Int16Array(N), pos: new Int32Array(N), ids: new Array(N), index: new Map(),
  };
  while (g.tokens.length < T) g.tokens.push(`#${inputTokens[g.tokens.length]}`);
  const specials = Array.isArray(o.special_positions) ? new Set(o.special_positions)
    : new Set(g.tokens.flatMap((t, p) => (SPECIAL_RE.test(t) ? [p] : [])));
  g.special = Uint8Array.from(g.tokens, (_, p) => (specials.has(p) ? 1 : 0));
  const labels = Array.isArray(o.feature_labels) ? o.feature_labels : [];

  for (let i = 0; i < nSel; i++) {
    const s = selected[i];
    g.featLayer[i] = active[3 * s]; g.featPos[i] = active[3 * s + 1]; g.featIndex[i] = active[3 * s + 2];
    g.featAct[i] = acts[s];
    g.featLabel[i] = typeof labels[i] === "string" ? labels[i] : "";
    setNode(g, i, FEATURE, g.featLayer[i], g.featPos[i], `${g.featLayer[i]}_${g.featIndex[i]}_${g.featPos[i]}`);
    g.rowNodes[i] = i;
  }
  for (let l = 0; l < L; l++) {
    for (let p = 0; p < T; p++) setNode(g, g.errorOffset + l * T + p, ERROR, l, p, `${l}_-1_${p}`);
  }
  for (let p = 0; p < T; p++) setNode(g, g.tokenOffset + p, TOKEN, -1, p, `E_${inputTokens[p]}_${p}`);
  for (let k = 0; k < K; k++) {
    setNode(g, g.logitOffset + k, LOGIT, L, T - 1, `${L + 1}_${g.logitId[k]}_${T - 1}`);
    g.rowNodes[nSel + k] = g.logitOffset + k;
  }
  return g;
}

function setNode(g, i, type, layer, pos, id) {
  g.type[i] = type; g.layer[i] = layer; g.pos[i] = pos; g.ids[i] = id;
  g.index.set(id, i);
}

/** The prompt as text without its special tokens (BOS, chat markers). */
export function promptText(g) {
  return g.tokens.filter((_, p) => !g.special[p]).join("");
}

/**
 * Prune on the client (./prune.js, docs/method.md §7). Returns
 *   {nodeThreshold, edgeThreshold, nodeMask, influence, cumulative, share [N], edges {src, dst, weight} [E],
 *    shown [N] (kept and connected, or a token / logit: the nodes the Neuronpedia JSON lists),
 *    inPtr/inIdx, outPtr/outIdx (each node's edge indices, largest |weight| first), maxAbs}
 * share = influence / Σ logit weights: the share of the logits' attribution that flows through the node.
 */
export function pruneGraph(g, nodeThreshold, edgeThreshold) {
  const r = prune({ rowNodes: g.rowNodes, indptr: g.csr.indptr, cols: g.csr.cols, vals: g.csr.vals, nNodes: g.N,
    nFeatures: g.nSel, nErrors: g.L * g.T, nTokens: g.T, logitWeights: g.logitProb }, nodeThreshold, edgeThreshold);
  const { src, dst, weight } = r.edges;
  // keep only edges between kept nodes (as the JSON does)
  const keep = [];
  for (let e = 0; e < src.length; e++) if (r.nodeMask[src[e]] && r.nodeMask[dst[e]]) keep.push(e);
  const edges = { src: Int32Array.from(keep, (e) => src[e]), dst: Int32Array.from(keep, (e) => dst[e]),
    weight: Float32Array.from(keep, (e) => weight[e]) };
  const E = keep.length;
  const shown = new Uint8Array(g.N);
  let maxAbs = 0;
  for (let e = 0; e < E; e++) {
    shown[edges.src[e]] = 1; shown[edges.dst[e]] = 1;
    maxAbs = Math.max(maxAbs, Math.abs(edges.weight[e]));
  }
  for (let i = g.tokenOffset; i < g.N; i++) shown[i] = 1;
  let wSum = 0;
  for (const w of g.logitProb) wSum += w;
  const share = Float32Array.from(r.influence, (x) => (wSum > 0 ? x / wSum : 0));
  const order = Int32Array.from({ length: E }, (_, e) => e).sort((a, b) => Math.abs(edges.weight[b]) - Math.abs(edges.weight[a]));
  const [inPtr, inIdx] = adjacency(order, edges.dst, g.N);
  const [outPtr, outIdx] = adjacency(order, edges.src, g.N);
  return { nodeThreshold, edgeThreshold, nodeMask: r.nodeMask, influence: r.influence, cumulative: r.cumulative,
    share, edges, E, shown, inPtr, inIdx, outPtr, outIdx, maxAbs };
}

// Edge indices grouped by `end[e]` (CSR), each group in `order`.
function adjacency(order, end, N) {
  const ptr = new Int32Array(N + 1);
  for (const e of order) ptr[end[e] + 1]++;
  for (let i = 0; i < N; i++) ptr[i + 1] += ptr[i];
  const fill = ptr.slice(0, N), idx = new Int32Array(order.length);
  for (const e of order) idx[fill[end[e]]++] = e;
  return [ptr, idx];
}

/** Edge indices into / out of node i in the pruned graph, largest |weight| first. */
export const incoming = (p, i) => p.inIdx.subarray(p.inPtr[i], p.inPtr[i + 1]);
export const outgoing = (p, i) => p.outIdx.subarray(p.outPtr[i], p.outPtr[i + 1]);

/** A[target, source] of the unpruned graph (0 when the target has no stored row or no such entry). */
export function directEffect(g, target, source) {
  const r = target < g.nSel ? target : target >= g.logitOffset ? g.nSel + target - g.logitOffset : -1;
  if (r < 0) return 0;
  const { indptr, cols, vals } = g.csr;
  let lo = indptr[r], hi = indptr[r + 1];
  while (lo < hi) { // columns are ascending within a row
    const m = (lo + hi) >> 1;
    if (cols[m] < source) lo = m + 1; else hi = m;
  }
  return lo < indptr[r + 1] && cols[lo] === source ? vals[lo] : 0;
}
