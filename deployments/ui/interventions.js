// The intervene panel: ablate / scale / set / add the selected node, the pinned nodes or a supernode, then show
// the next-token distribution before vs after (POST /v1/interventions) or plain vs steered text (POST /v1/steer).
import * as api from "./api.js";
import { $, el, fmt, showToken } from "./dom.js";
import { ERROR, FEATURE } from "./graph-model.js";

let context = () => null; // () -> {g, selected, pins: [node], supernodes: [{label, members}]}
let seq = 0;              // drops replies that a newer request or graph superseded

/** Wire the panel; getContext() returns the current graph and selections; onError(message). */
export function setupInterventions(getContext, onError) {
  context = getContext;
  const guard = (fn) => () => fn().catch((e) => onError(e.message || String(e)));
  $("#iv-run").addEventListener("click", guard(runIntervention));
  $("#iv-steer").addEventListener("click", guard(runSteer));
}

/** The target choices: the selected node, the pinned nodes, each supernode (value "sn:<index>"). */
export function renderTargets(supernodes) {
  const sel = $("#iv-target"), prev = sel.value;
  sel.replaceChildren(el("option", { value: "selected" }, "selected node"), el("option", { value: "pinned" }, "pinned nodes"),
    ...supernodes.map((s, i) => el("option", { value: `sn:${i}` }, `supernode “${s.label}”`)));
  if ([...sel.options].some((o) => o.value === prev)) sel.value = prev;
}

export function clearResult() {
  seq++;
  $("#iv-result").replaceChildren();
}

// Feature and error nodes become interventions at their own position; tokens and logits cannot be changed.
function request() {
  const c = context();
  if (!c) throw new Error("Load a graph first.");
  const { g } = c, t = $("#iv-target").value;
  const ids = t === "selected" ? (c.selected === null ? [] : [c.selected]) : t === "pinned" ? c.pins
    : c.supernodes[Number(t.slice(3))]?.members ?? [];
  const op = $("#iv-op").value, v = parseFloat($("#iv-value").value), value = Number.isFinite(v) ? v : 0;
  const interventions = [];
  for (const i of ids) {
    const base = { layer: g.layer[i], op, value, positions: [g.pos[i]] };
    if (g.type[i] === FEATURE) interventions.push({ ...base, feature: g.featIndex[i] });
    else if (g.type[i] === ERROR) interventions.push({ ...base, feature: null });
  }
  if (!interventions.length) {
    throw new Error(ids.length ? "The target has no feature or error nodes (tokens and logits cannot be intervened on)."
      : "No target nodes: select, pin or group some first.");
  }
  return { tokens: [...g.inputTokens], interventions };
}

async function call(fn, extra, render) {
  const body = { ...request(), ...extra };
  const mine = ++seq, box = $("#iv-result");
  box.replaceChildren(el("p", { class: "muted" }, "running…"));
  for (const b of ["#iv-run", "#iv-steer"]) $(b).disabled = true;
  try {
    const r = await fn(body);
    if (mine === seq) { render(r, box); box.scrollIntoView({ block: "nearest" }); }
  } catch (e) {
    if (mine === seq) box.replaceChildren();
    throw e;
  } finally {
    if (mine === seq) for (const b of ["#iv-run", "#iv-steer"]) $(b).disabled = false;
  }
}

function runIntervention() {
  return call(api.intervene, { top_k: 10 }, (r, box) => {
    const before = new Map((r.top_before || []).map((t) => [t.token_id, t]));
    const after = new Map((r.top_after || []).map((t) => [t.token_id, t]));
    // the top tokens before, then any new ones after; "–": outside that top k
    const rows = [...(r.top_before || []), ...(r.top_after || []).filter((t) => !before.has(t.token_id))].map((t) => {
      const pb = before.get(t.token_id)?.prob, pa = after.get(t.token_id)?.prob;
      const dir = pb !== undefined && pa !== undefined ? (pa > pb ? "up" : pa < pb ? "down" : "") : "";
      return el("tr", { class: "iv-row", title: `token id ${t.token_id}` },
        el("td", { class: "tok" }, showToken(t.token)), el("td", {}, fmt(pb)), el("td", { class: dir }, fmt(pa)));
    });
    box.replaceChildren(el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "next token"), el("th", {}, "p before"), el("th", {}, "p after"))),
      el("tbody", {}, ...rows)));
  });
}

function runSteer() {
  const n = parseInt($("#iv-tokens").value, 10);
  return call(api.steer, { max_new_tokens: Number.isFinite(n) ? n : 20 }, (r, box) => {
    box.replaceChildren(
      el("h4", {}, "plain"), el("div", { id: "iv-plain", class: "iv-text" }, r.plain ?? ""),
      el("h4", {}, "steered"), el("div", { id: "iv-steered", class: "iv-text" }, r.steered ?? ""));
  });
}
