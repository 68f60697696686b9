// Feature dashboards (fetched on demand, cached) and the names nodes are shown with.
//
// A feature's label is, in order: the graph's own `feature_labels` (the feature store's best explanation), the
// dashboard's top activating token → top logit once its dashboard is loaded, else "L{layer} #{feature}".
import * as api from "./api.js";
import { showToken } from "./dom.js";
import { ERROR, FEATURE, LOGIT } from "./graph-model.js";

const cache = new Map(); // "layer/feature" -> dashboard | null (no dashboard) | Promise

/** The dashboard of (layer, feature), or null; fetched once. */
export async function dashboard(layer, feature) {
  const key = `${layer}/${feature}`;
  if (!cache.has(key)) {
    const pending = api.feature(layer, feature).then((d) => { cache.set(key, d); return d; },
      (e) => { cache.delete(key); throw e; });
    cache.set(key, pending);
  }
  return cache.get(key);
}

// Fallback labels need dashboards: a queue fetches those of the features on show, three at a time, and calls
// onArrive(g) once a batch has arrived (debounced), so labels can be re-rendered.
const queue = { todo: [], asked: new Set(), workers: 0, timer: 0 };

/** Fetch the dashboards of these nodes of `g` that are features without a label; `fresh`: drop what was queued. */
export function wantLabels(g, nodes, onArrive, fresh = false) {
  const q = queue;
  if (fresh) { q.todo = []; q.asked.clear(); }
  for (const i of nodes) {
    const key = `${g.featLayer[i]}/${g.featIndex[i]}`;
    if (g.type[i] !== FEATURE || g.featLabel[i] || q.asked.has(key)) continue;
    q.asked.add(key);
    q.todo.push([g, i, onArrive]);
  }
  for (; q.workers < 3 && q.todo.length; q.workers++) {
    (async () => {
      while (q.todo.length) {
        const [g2, i, done] = q.todo.shift();
        await dashboard(g2.featLayer[i], g2.featIndex[i]).catch(() => null);
        clearTimeout(q.timer);
        q.timer = setTimeout(() => { q.timer = 0; done(g2); }, 150);
      }
      q.workers--;
    })();
  }
}

/** No label fetch or refresh pending. */
export const labelsSettled = () => queue.workers === 0 && !queue.timer;

/** The dashboard if it is already loaded; undefined otherwise. */
export function loadedDashboard(layer, feature) {
  const d = cache.get(`${layer}/${feature}`);
  return d instanceof Promise ? undefined : d;
}

/** "top activating token → top logit" from a dashboard, or "" when it has neither. */
export function dashboardLabel(d) {
  if (!d) return "";
  let tok = "";
  const ex = d.examples_quantiles?.[0]?.examples?.[0];
  if (ex && ex.tokens?.length) {
    const acts = ex.tokens_acts_list || [];
    let arg = 0;
    acts.forEach((a, i) => { if (a > acts[arg]) arg = i; });
    tok = ex.tokens[arg] ?? "";
  }
  const logit = d.top_logits?.[0] ?? "";
  if (!tok && !logit) return "";
  return `“${showToken(tok.trim() ? tok.trim() : tok)}” → “${showToken(logit.trim() ? logit.trim() : logit)}”`;
}

/** A node's name: the feature's label (see above), "error L3", the token, or the logit's token. */
export function nodeLabel(g, i) {
  switch (g.type[i]) {
    case FEATURE: {
      const l = g.featLayer[i], f = g.featIndex[i];
      return g.featLabel[i] || dashboardLabel(loadedDashboard(l, f)) || `L${l} #${f}`;
    }
    case ERROR: return `error L${g.layer[i]}`;
    case LOGIT: return `“${showToken(g.logitToken[i - g.logitOffset])}”`;
    default: return `“${showToken(g.tokens[g.pos[i]])}”`;
  }
}

/** Where a node sits: "L3 · “ capital”" (layer and its position's token). */
export function nodeWhere(g, i) {
  const at = `“${showToken(g.tokens[g.pos[i]] ?? "")}”`;
  switch (g.type[i]) {
    case FEATURE: return `L${g.layer[i]} #${g.featIndex[i]} · ${at}`;
    case ERROR: return `L${g.layer[i]} · ${at}`;
    case LOGIT: return `output, p = ${g.logitProb[i - g.logitOffset].toFixed(3)}`;
    default: return `embedding · pos ${g.pos[i]}`;
  }
}
