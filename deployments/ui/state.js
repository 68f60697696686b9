// The view's state in the URL hash, so a link or a reload restores it:
//   #graph=ID&prompt=TEXT&nt=0.8&et=0.98&sel=NODE&pins=A,B&sn=LABEL:A;B|LABEL2:C&view=graph|subgraph&errors=0&all=1
// Node ids never hold , ; : or | (docs/formats.md §e); supernode labels are URI-encoded inside the value.

/** {graph, prompt, nodeThreshold, edgeThreshold, selected, pins, supernodes, view, showErrors, allEdges}; unset = null. */
export function readUrl() {
  const q = new URLSearchParams(location.hash.replace(/^#/, ""));
  const num = (k) => { const v = parseFloat(q.get(k)); return Number.isFinite(v) ? Math.min(1, Math.max(0, v)) : null; };
  const dec = (s) => { try { return decodeURIComponent(s); } catch (_) { return s; } };
  const list = (s, sep) => (s ? s.split(sep).filter(Boolean) : []);
  return {
    graph: q.get("graph"),
    prompt: q.get("prompt"),
    nodeThreshold: num("nt"),
    edgeThreshold: num("et"),
    selected: q.get("sel"),
    pins: list(q.get("pins"), ","),
    supernodes: list(q.get("sn"), "|").map((item) => {
      const c = item.indexOf(":");
      return c < 0 ? { label: dec(item), ids: [] } : { label: dec(item.slice(0, c)), ids: list(item.slice(c + 1), ";") };
    }).filter((s) => s.ids.length),
    view: q.get("view") === "subgraph" ? "subgraph" : "graph",
    showErrors: q.get("errors") !== "0",
    allEdges: q.get("all") === "1",
  };
}

/** Replace the hash with `s` (same fields as readUrl); no history entry, no hashchange event. */
export function writeUrl(s) {
  if (!s.graph) return;
  const q = new URLSearchParams({ graph: s.graph });
  if (s.prompt) q.set("prompt", s.prompt);
  q.set("nt", s.nodeThreshold.toFixed(2));
  q.set("et", s.edgeThreshold.toFixed(3));
  if (s.selected) q.set("sel", s.selected);
  if (s.pins.length) q.set("pins", s.pins.join(","));
  if (s.supernodes.length) q.set("sn", s.supernodes.map((x) => `${encodeURIComponent(x.label)}:${x.ids.join(";")}`).join("|"));
  if (s.view !== "graph") q.set("view", s.view);
  if (!s.showErrors) q.set("errors", "0");
  if (s.allEdges) q.set("all", "1");
  history.replaceState(null, "", `#${q}`);
}
