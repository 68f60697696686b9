// Client-side pruning of attribution graphs: a port of attribute_ray/pruning.py `prune` (docs/method.md §7)
// on a CSR of the stored adjacency rows (A[target, source]; rows = feature and logit nodes), never N×N.
//
// Arithmetic: sums, influence and edge scores are computed in Float64 (closer to the exact values than the
// reference's float32). Every value a threshold decision reads is then rounded to float32 and the decision
// is replayed as torch does it: sorted float32 scores, a cumulative sum accumulated in double and stored as
// float32 (torch's CPU cumsum), divided in float32 by the float32 total, compared with float32(tau), and
// mask = score >= sorted[idx] (ties on the threshold are kept). The node and edge masks equal Python's
// except where the reference's own float32 rounding decides (a cumulative share within ~1e-7 of tau; at
// edge threshold 1.0, the last edges whose scores sum to < ~1e-7 of the total: see tests/test_prune_js.py).

const NORM_EPS = 1e-10; // pruning.NORM_EPS: |M| / max(rowsum|M|, 1e-10)
const MAX_ITER = 1000; // pruning.influence: at most 1000 non-zero terms
const f32 = Math.fround;

/** CSR of the msgpack `rows` array ({masked: true, shape [R, N], mask, values}, docs/formats.md §h).
 * mask: numpy packbits (big-endian bit order, row-major) of the R×N non-zero flags; values: Float32Array of the
 * non-zeros in row-major order (msgpack's binary views sit at any byte offset: view an aligned copy, e.g.
 * `new Float32Array(values.data.slice().buffer)`). Returns {indptr: Int32Array [R + 1], cols: Int32Array [nnz],
 * vals: Float32Array [nnz] (= values)}. */
export function csrFromMasked(mask, values, R, N) {
  const total = R * N;
  if (mask.length < Math.ceil(total / 8)) throw new Error(`mask has ${mask.length} bytes, expected ${Math.ceil(total / 8)}`);
  const indptr = new Int32Array(R + 1);
  const cols = new Int32Array(values.length);
  let k = 0, row = 0, rowEnd = N;
  const nBytes = Math.ceil(total / 8);
  for (let b = 0; b < nBytes; b++) {
    const byte = mask[b];
    if (byte === 0) continue;
    for (let bit = 0; bit < 8; bit++) {
      if (!(byte & (0x80 >> bit))) continue;
      const pos = b * 8 + bit;
      if (pos >= total) break; // padding bits of the last byte
      while (pos >= rowEnd) { indptr[++row] = k; rowEnd += N; }
      if (k >= values.length) throw new Error("mask has more set bits than there are values");
      cols[k++] = pos - (rowEnd - N);
    }
  }
  if (k !== values.length) throw new Error(`mask has ${k} set bits but there are ${values.length} values`);
  while (row < R) indptr[++row] = k;
  return { indptr, cols, vals: values };
}

/** Σ_{k≥1} w·Âᵏ for Â given by the CSR (rowNodes, indptr, cols, a) and w [N] (Float64). Throws when not a DAG. */
function influence(rowNodes, indptr, cols, a, w, n) {
  const R = rowNodes.length;
  let x = new Float64Array(n), next = new Float64Array(n);
  const total = new Float64Array(n);
  let src = w;
  for (let it = 0; it <= MAX_ITER; it++) {
    x.fill(0);
    let any = false;
    for (let r = 0; r < R; r++) {
      const s = src[rowNodes[r]];
      if (s === 0) continue;
      for (let j = indptr[r]; j < indptr[r + 1]; j++) x[cols[j]] += s * a[j];
    }
    for (let i = 0; i < n; i++) if (x[i] !== 0) { any = true; total[i] += x[i]; }
    if (!any) return total;
    if (it === MAX_ITER) break;
    [x, next] = [next, x];
    src = next; // the term just computed feeds the next product
  }
  throw new Error(`influence still non-zero after ${MAX_ITER} terms: the graph is not a DAG`);
}

/** a [nnz] = |vals| / max(rowsum |vals|, 1e-10) per row, with entries where keep(r, j) is false set to 0. */
function normalized(indptr, vals, keep) {
  const R = indptr.length - 1;
  const a = new Float64Array(vals.length);
  for (let r = 0; r < R; r++) {
    let sum = 0;
    for (let j = indptr[r]; j < indptr[r + 1]; j++) if (keep(r, j)) { a[j] = Math.abs(vals[j]); sum += a[j]; }
    const d = Math.max(sum, NORM_EPS);
    for (let j = indptr[r]; j < indptr[r + 1]; j++) a[j] /= d;
  }
  return a;
}

/** torch's cumulative-share rule on float32 scores sorted descending (plus nZeros implicit zeros after them):
 * cum = float32(double running sum), c = float32(cum / float32 total), idx = the first i with c >= f32(tau).
 * Returns {threshold: sorted[min(idx, n − 1)] (0 when idx lands on the zeros), cumShare: Float32Array c}. */
function cumulativeThreshold(sorted, tau, nZeros) {
  const n = sorted.length;
  let total = 0;
  for (let i = 0; i < n; i++) total += sorted[i];
  const total32 = f32(total), tau32 = f32(tau);
  const cumShare = new Float32Array(n);
  let run = 0, idx = -1;
  for (let i = 0; i < n; i++) {
    run += sorted[i];
    cumShare[i] = f32(f32(run) / total32);
    if (idx < 0 && cumShare[i] >= tau32) idx = i;
  }
  if (idx >= 0) return { threshold: sorted[idx], cumShare };
  return { threshold: nZeros > 0 || n === 0 ? 0 : sorted[n - 1], cumShare }; // upstream clamps to the last element
}

/** prune_graph (docs/method.md §7) on the CSR of the stored rows.
 * graph: {rowNodes: Int32Array [R] (node of each stored row), indptr, cols, vals (csrFromMasked), nNodes: N,
 *         nFeatures, nErrors, nTokens, logitWeights: Float32Array [K] (on the last K nodes)}.
 * Returns {nodeMask: Uint8Array [N], influence: Float32Array [N] (node influence), cumulative: Float32Array [N]
 *          (cumulative share of influence at each node's rank), edges: {src, dst: Int32Array, weight: Float32Array}}:
 * the kept edges between kept nodes, weight = the signed A[dst, src], in row-major (dst row, src) order. */
export function prune(graph, nodeThreshold, edgeThreshold) {
  const { rowNodes, indptr, cols, vals, nNodes: n, nFeatures, nErrors, nTokens, logitWeights } = graph;
  for (const [name, t] of [["nodeThreshold", nodeThreshold], ["edgeThreshold", edgeThreshold]]) {
    if (!(t >= 0 && t <= 1)) throw new RangeError(`${name} must be between 0.0 and 1.0`);
  }
  const R = rowNodes.length, K = logitWeights.length, nnz = cols.length;
  const nDroppable = nFeatures + nErrors; // tokens and logits are always kept
  if (n !== nDroppable + nTokens + K) throw new Error(`nNodes is ${n}, expected nFeatures + nErrors + nTokens + K`);
  if (indptr.length !== R + 1 || vals.length !== nnz) throw new Error("CSR does not match rowNodes");
  const w = new Float64Array(n);
  for (let k = 0; k < K; k++) w[n - K + k] = f32(logitWeights[k]);

  // 1. node influence and the node threshold
  const infl64 = influence(rowNodes, indptr, cols, normalized(indptr, vals, () => true), w, n);
  const infl = Float32Array.from(infl64);
  const order = new Int32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  order.sort((i, j) => infl[j] - infl[i] || i - j); // descending; ties by node index
  const node = cumulativeThreshold(Float32Array.from(order, (i) => infl[i]), nodeThreshold, 0);
  const nodeMask = new Uint8Array(n);
  for (let i = 0; i < n; i++) nodeMask[i] = i >= nDroppable || infl[i] >= node.threshold ? 1 : 0;

  // 2. edge scores on the graph restricted to kept nodes: P ⊙ (influence(P, w) + w)[target]
  const p = normalized(indptr, vals, (r, j) => nodeMask[rowNodes[r]] && nodeMask[cols[j]]);
  const pInfl = influence(rowNodes, indptr, cols, p, w, n);
  const scores = new Float32Array(nnz);
  for (let r = 0; r < R; r++) {
    const t = pInfl[rowNodes[r]] + w[rowNodes[r]];
    for (let j = indptr[r]; j < indptr[r + 1]; j++) scores[j] = p[j] * t;
  }
  const sortedScores = scores.slice().sort().reverse(); // numeric sort of a Float32Array, then descending
  const edge = cumulativeThreshold(sortedScores, edgeThreshold, n * n - nnz); // all N² entries, as upstream
  const edgeMask = new Uint8Array(nnz);
  for (let j = 0; j < nnz; j++) edgeMask[j] = scores[j] >= edge.threshold ? 1 : 0;

  // 3. drop feature/error nodes without kept outgoing edges and features without kept incoming edges, until
  //    stable. With a zero threshold every entry, zeros included, is a kept edge: nothing is dropped.
  if (edge.threshold > 0) {
    const outgoing = new Uint8Array(n), incoming = new Uint8Array(n);
    for (;;) {
      outgoing.fill(0);
      incoming.fill(0);
      for (let r = 0; r < R; r++) {
        for (let j = indptr[r]; j < indptr[r + 1]; j++) {
          if (edgeMask[j]) { outgoing[cols[j]] = 1; incoming[rowNodes[r]] = 1; }
        }
      }
      let changed = false;
      for (let i = 0; i < nDroppable; i++) {
        if (nodeMask[i] && (!outgoing[i] || (i < nFeatures && !incoming[i]))) { nodeMask[i] = 0; changed = true; }
      }
      if (!changed) break;
      for (let r = 0; r < R; r++) {
        const rowKept = nodeMask[rowNodes[r]];
        for (let j = indptr[r]; j < indptr[r + 1]; j++) if (!rowKept || !nodeMask[cols[j]]) edgeMask[j] = 0;
      }
    }
  }

  // 4. cumulative share of node influence at each node's rank; the kept edges between kept nodes
  const cumulative = new Float32Array(n);
  for (let i = 0; i < n; i++) cumulative[order[i]] = node.cumShare[i];
  let m = 0;
  for (let r = 0; r < R; r++) {
    if (!nodeMask[rowNodes[r]]) continue;
    for (let j = indptr[r]; j < indptr[r + 1]; j++) if (edgeMask[j] && nodeMask[cols[j]]) m++;
  }
  const src = new Int32Array(m), dst = new Int32Array(m), weight = new Float32Array(m);
  m = 0;
  for (let r = 0; r < R; r++) {
    if (!nodeMask[rowNodes[r]]) continue;
    for (let j = indptr[r]; j < indptr[r + 1]; j++) {
      if (edgeMask[j] && nodeMask[cols[j]]) { src[m] = cols[j]; dst[m] = rowNodes[r]; weight[m] = vals[j]; m++; }
    }
  }
  return { nodeMask, influence: infl, cumulative, edges: { src, dst, weight } };
}
