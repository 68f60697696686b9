// Running a prompt: the settings form, the streamed progress (POST /v1/graphs/stream) and cancel.
import * as api from "./api.js";
import { $ } from "./dom.js";

let job = null; // the running job's id, for Cancel

/** Fill the settings form with the service's defaults (GET /v1/models `defaults`). */
export function formDefaults(d) {
  const set = (id, v) => { if (v !== null && v !== undefined) $(id).value = v; };
  set("#max-feature-nodes", d.max_feature_nodes);
  set("#max-n-logits", d.max_n_logits);
  set("#desired-logit-prob", d.desired_logit_prob);
  set("#batch-size", d.batch_size);
}

function formBody() {
  const body = { prompt: $("#prompt").value };
  const num = (id, key, int) => {
    const raw = $(id).value.trim();
    if (raw !== "") body[key] = int ? parseInt(raw, 10) : parseFloat(raw);
  };
  num("#max-feature-nodes", "max_feature_nodes", true);
  num("#max-n-logits", "max_n_logits", true);
  num("#desired-logit-prob", "desired_logit_prob", false);
  num("#batch-size", "batch_size", true);
  return body;
}

function setProgress(phase, done, total) {
  $("#progress").hidden = false;
  const bar = $("#progress-bar");
  if (total > 0) { bar.max = total; bar.value = done; } else bar.removeAttribute("value");
  $("#progress-text").textContent = total > 0 ? `${phase} ${done}/${total}` : phase;
}

/** Hide the progress bar once its job is done (it stays for errors and cancellations). */
export function hideFinishedProgress() {
  if ($("#progress-text").textContent.startsWith("done")) $("#progress").hidden = true;
}

/** Run the form's prompt with streamed progress; the graph id when done, null when cancelled. */
export async function runPrompt() {
  const body = formBody();
  if (!body.prompt.trim()) throw new Error("Enter a prompt first.");
  $("#run").disabled = true;
  setProgress("submitting", 0, 0);
  let graphId = null;
  try {
    await api.streamGraph(body, (ev) => {
      if (ev.event === "queued") { job = ev.job_id; $("#cancel").hidden = false; setProgress("queued", 0, 0); }
      else if (ev.event === "progress") setProgress(ev.phase, ev.done, ev.total);
      else if (ev.event === "done") { graphId = ev.graph_id; setProgress(ev.cached ? "done (cached)" : "done", 1, 1); }
      else if (ev.event === "failed") throw new Error(`graph failed: ${ev.error}`);
      else if (ev.event === "cancelled") setProgress("cancelled", 0, 1);
    });
  } catch (e) {
    setProgress("error", 0, 1);
    throw e;
  } finally {
    job = null;
    $("#cancel").hidden = true;
    $("#run").disabled = false;
  }
  return graphId;
}

export async function cancelJob() {
  if (job) await api.cancelJob(job);
}
