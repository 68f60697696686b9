// The selected node's panel (summary, incoming and outgoing edges), a feature's dashboard, the prompt line.
import { $, el, fmt, pct, showToken } from "./dom.js";
import { ERROR, FEATURE, LOGIT, TYPE_NAMES, incoming, outgoing } from "./graph-model.js";

export const INFLUENCE_HELP = "Influence: the share of the logits' attribution that flows through this node " +
  "(all paths from the node to the logits, each logit weighted by its probability). The prune slider keeps the " +
  "most influential nodes until together they carry the chosen share of the total influence.";
const MAX_EDGES = 60;

/**
 * Fill `box` with node i's summary and its edges in the pruned graph, largest |weight| first.
 * ctx: {g, p, label(i), where(i), pinned: bool, onSelect(i), onPin()}.
 */
export function renderNodePanel(box, i, ctx) {
  const { g, p } = ctx;
  if (i === null || i === undefined) {
    box.replaceChildren(el("p", { class: "muted" }, "Click a node in the graph to inspect it."));
    return;
  }
  const facts = [fact("type", TYPE_NAMES[g.type[i]])];
  if (g.type[i] !== LOGIT) facts.push(fact("at", ctx.where(i)));
  if (g.type[i] === FEATURE) facts.push(fact("activation", fmt(g.featAct[i])));
  if (g.type[i] === FEATURE || g.type[i] === ERROR) {
    facts.push(el("span", { class: "fact help", title: INFLUENCE_HELP }, el("span", { class: "k" }, "influence", el("span", { class: "q" }, "?")), pct(p.share[i])));
  }
  if (g.type[i] === LOGIT) facts.push(fact("probability", fmt(g.logitProb[i - g.logitOffset], 4)));
  if (!p.shown[i]) facts.push(el("span", { class: "fact warn" }, "pruned away at these thresholds"));
  const list = (edges, end, title) => el("div", { class: "edge-col" },
    el("h4", {}, `${title} (${edges.length})`),
    edges.length ? el("ol", { class: "edge-list" }, ...[...edges.slice(0, MAX_EDGES)].map((e) => edgeItem(ctx, e, end(e))))
      : el("p", { class: "muted" }, "none"));
  box.replaceChildren(
    el("div", { class: "panel-head" },
      el("h3", { class: "node-title", title: g.ids[i] }, ctx.label(i)),
      el("button", { id: "pin", type: "button", onclick: ctx.onPin }, ctx.pinned ? "Unpin" : "Pin")),
    el("div", { class: "facts" }, ...facts),
    el("div", { class: "edge-cols" },
      list(incoming(p, i), (e) => p.edges.src[e], "Incoming"),
      list(outgoing(p, i), (e) => p.edges.dst[e], "Outgoing")));
}

function fact(k, v) {
  return el("span", { class: "fact" }, el("span", { class: "k" }, k), v);
}

function edgeItem(ctx, e, other) {
  const w = ctx.p.edges.weight[e], rel = Math.abs(w) / (ctx.p.maxAbs || 1);
  const bar = el("span", { class: `bar ${w < 0 ? "neg" : "pos"}`, style: { width: `${Math.max(2, 100 * Math.sqrt(rel))}%` } });
  return el("li", { class: "edge-item", dataset: { nodeId: ctx.g.ids[other] }, title: ctx.g.ids[other], onclick: () => ctx.onSelect(other) },
    bar, el("span", { class: "lbl" }, ctx.label(other), el("small", {}, ctx.where(other))),
    el("span", { class: `w ${w < 0 ? "neg" : "pos"}` }, (w > 0 ? "+" : "") + fmt(w, 3)));
}

/** Fill `box` with a feature dashboard (docs/formats.md §f): explanations, logits, histogram, examples. */
export function renderDashboard(box, d, title) {
  const side = [el("div", { class: "muted" },
    `active on ${pct(d.activation_frequency, 2)} of tokens · max activation ${fmt(d.act_max, 2)}`)];
  if (d.explanations?.length) {
    side.push(el("h4", {}, "Explanations"), el("ol", { class: "explanations" }, ...d.explanations.map((x) =>
      el("li", {}, el("span", {}, x.text), el("small", { class: "muted", title: "detection score (balanced accuracy)" },
        ` ${x.explainer}${x.score === null || x.score === undefined ? "" : ` · ${fmt(x.score, 2)}`}`)))));
  }
  const chips = (cls, list) => el("div", { class: `chips ${cls}` }, ...(list || []).map((t) => el("span", { title: JSON.stringify(t) }, showToken(t))));
  side.push(el("h4", {}, "Top logits"), chips("pos", d.top_logits), el("h4", {}, "Bottom logits"), chips("neg", d.bottom_logits));
  if (d.histogram?.length) side.push(el("h4", {}, "Activation histogram"), histogram(d.histogram, d.act_min, d.act_max));
  const examples = [];
  for (const q of d.examples_quantiles || []) {
    examples.push(el("h4", {}, q.quantile_name));
    for (const ex of (q.examples || []).slice(0, 8)) examples.push(example(ex, d.act_max));
  }
  box.replaceChildren(
    el("div", { class: "dash-head" }, el("h3", {}, title)),
    el("div", { class: "dash-grid" }, el("div", { class: "dash-side" }, ...side), el("div", { class: "dash-examples" }, ...examples)));
}

function histogram(counts, lo, hi) {
  const W = 220, H = 54, max = Math.max(1, ...counts), bw = W / counts.length;
  const svg = el("svg", { class: "hist", width: W, height: H + 14, viewBox: `0 0 ${W} ${H + 14}` });
  counts.forEach((c, i) => {
    const h = (c / max) * (H - 2);
    svg.append(el("rect", { x: (i * bw).toFixed(1), y: (H - h).toFixed(1), width: Math.max(1, bw - 1).toFixed(1), height: h.toFixed(1) },
      el("title", {}, `${c}`)));
  });
  svg.append(el("text", { x: 0, y: H + 12 }, fmt(lo, 1)), el("text", { x: W, y: H + 12, "text-anchor": "end" }, fmt(hi, 1)));
  return svg;
}

// One context window, each token shaded by its activation relative to the feature's max.
function example(ex, actMax) {
  const acts = ex.tokens_acts_list || [];
  let arg = 0;
  acts.forEach((a, i) => { if (a > acts[arg]) arg = i; });
  const max = actMax || Math.max(1e-9, ...acts);
  return el("div", { class: "example" }, ...(ex.tokens || []).map((t, i) => {
    const a = Math.max(0, acts[i] || 0);
    const span = el("span", { title: fmt(acts[i] || 0) }, t.replace(/\n/g, "↵"));
    if (a > 0) span.style.backgroundColor = `rgba(232,131,58,${Math.min(1, 0.15 + 0.85 * a / max).toFixed(3)})`;
    if (i === arg && a > 0) span.classList.add("max");
    return span;
  }));
}

/** The info line: the prompt's tokens (special ones greyed, never glued to the text) and the graph's scores. */
export function renderPromptLine(g) {
  $("#prompt-tokens").replaceChildren(...g.tokens.map((t, p) => el("span", {
    class: `ptok${g.special[p] ? " special" : ""}`, title: `position ${p}${g.special[p] ? " (special token)" : ""}`,
  }, showToken(t))));
  const sc = g.scores || {};
  $("#scores").textContent = sc.replacement === undefined ? ""
    : `replacement ${fmt(sc.replacement, 2)} · completeness ${fmt(sc.completeness, 2)}`;
  $("#scores").title = "replacement: share of the influence that reaches the logits from tokens rather than error nodes; " +
    "completeness: influence-weighted share of node inputs not from error nodes (docs/method.md §8)";
}

/** The dashboard pane while node i (or nothing) is selected and it is not a feature: what it is, how to read the view. */
export function renderNoDashboard(box, g, i) {
  const what = i === null ? "" : g.type[i] === LOGIT
    ? `Output “${showToken(g.logitToken[i - g.logitOffset])}”, probability ${fmt(g.logitProb[i - g.logitOffset], 3)}: ` +
      "its incoming edges (left) are the direct effects of the nodes that drive it. "
    : `A ${TYPE_NAMES[g.type[i]]} node has no dashboard. `;
  box.replaceChildren(el("p", {}, `${what}Select a feature to see its dashboard.`), guide());
}

function guide() {
  const li = (...parts) => el("li", {}, ...parts);
  return el("div", { class: "guide" }, el("h4", {}, "Reading the graph"), el("ul", {},
    li(el("b", {}, "Columns"), " are the prompt's tokens (special tokens in grey), ", el("b", {}, "rows"),
      " the layers: token embeddings at the bottom, the model's most likely next tokens on top."),
    li(el("b", {}, "Orange dots"), " are transcoder features active at that token; ", el("b", {}, "grey squares"),
      " are what the transcoders fail to reconstruct (error nodes)."),
    li(el("b", {}, "Lines"), " are direct effects: blue excites, red inhibits, thicker is stronger. Only the hovered or " +
      "selected node's edges are drawn; “all edges” draws every edge kept by pruning."),
    li(el("b", { class: "help", title: INFLUENCE_HELP }, "Influence"), " is the share of the logits' attribution that flows " +
      "through a node; the nodes slider keeps the most influential ones."),
    li("Click a node for its edges and its feature dashboard; ", el("b", {}, "Pin"), " nodes and ", el("b", {}, "Group"),
      " them into supernodes for the subgraph; intervene on them on the right.")));
}
