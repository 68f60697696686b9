// The service's HTTP API as the UI uses it; every request goes through authFetch (token.js: the bearer token of a
// service started with --api-token, asked for on the first 401).

import { authFetch } from "./token.js";

const MSGPACK = "application/msgpack";

// FastAPI errors come as {"detail": str} or {"detail": [{loc, msg}]} (validation errors).
async function httpError(res) {
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  const d = body && body.detail;
  const text = typeof d === "string" ? d
    : Array.isArray(d) ? d.map((x) => `${(x.loc || []).join(".")}: ${x.msg}`).join("\n") : `HTTP ${res.status}`;
  const err = new Error(text);
  err.status = res.status;
  return err;
}

export async function getJSON(url) {
  const res = await authFetch(url, { headers: { Accept: "application/json" } });
  if (!res.ok) throw await httpError(res);
  return res.json();
}

export async function postJSON(url, body) {
  const res = await authFetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify(body),
  });
  if (!res.ok) throw await httpError(res);
  return res.json();
}

export const models = () => getJSON("/v1/models");
export const recentGraphs = () => getJSON("/v1/graphs").then((r) => r.graphs);

/** The whole graph in the msgpack wire format (docs/formats.md §h): the UI's one graph request. */
export async function graphBytes(id) {
  const res = await authFetch(`/v1/graphs/${encodeURIComponent(id)}`, { headers: { Accept: MSGPACK } });
  if (!res.ok) throw await httpError(res);
  return new Uint8Array(await res.arrayBuffer());
}

/** The server's Neuronpedia JSON of the graph pruned at these thresholds (for the download button only). */
export async function graphJsonBlob(id, nodeThreshold, edgeThreshold) {
  const q = new URLSearchParams({ node_threshold: String(nodeThreshold), edge_threshold: String(edgeThreshold) });
  const res = await authFetch(`/v1/graphs/${encodeURIComponent(id)}?${q}`, { headers: { Accept: "application/json" } });
  if (!res.ok) throw await httpError(res);
  return res.blob();
}

/** A feature's dashboard JSON, or null when the service has none for it (404). */
export async function feature(layer, index) {
  try {
    return await getJSON(`/v1/features/${layer}/${index}`);
  } catch (e) {
    if (e.status === 404) return null;
    throw e;
  }
}

/** POST /v1/graphs/stream; calls onEvent for every NDJSON event ({"event": "queued"|"progress"|...}). */
export async function streamGraph(body, onEvent) {
  const res = await authFetch("/v1/graphs/stream", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/x-ndjson" },
    body: JSON.stringify(body),
  });
  if (!res.ok) throw await httpError(res);
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buf += dec.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {  // a line may span chunks
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (line) onEvent(JSON.parse(line));
    }
    if (done) break;
  }
  if (buf.trim()) onEvent(JSON.parse(buf));
}

export async function cancelJob(jobId) {
  const res = await authFetch(`/v1/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE" });
  if (!res.ok) throw await httpError(res);
}

export const intervene = (body) => postJSON("/v1/interventions", body);
export const steer = (body) => postJSON("/v1/steer", body);
