// Small DOM and formatting helpers shared by the UI modules.

export const $ = (sel) => document.querySelector(sel);

/** el("div", {class: "x", onclick: fn, dataset: {...}}, ...children): a new element. */
export function el(tag, attrs = {}, ...children) {
  const svg = ["svg", "g", "rect", "circle", "line", "path", "text", "title", "polygon"].includes(tag);
  const e = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.setAttribute("class", v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "style" && typeof v === "object") Object.assign(e.style, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) e.append(c);
  return e;
}

export function fmt(x, digits = 3) {
  if (x === undefined || x === null || Number.isNaN(x)) return "–";
  return typeof x === "number" ? x.toFixed(digits) : String(x);
}

export function pct(x, digits = 1) {
  return Number.isFinite(x) ? `${(100 * x).toFixed(digits)}%` : "–";
}

/** A token as shown to people: newlines as ↵, tabs as ⇥, a token of only spaces as ␣. */
export function showToken(t) {
  const s = String(t).replace(/\n/g, "↵").replace(/\t/g, "⇥");
  return /^ +$/.test(s) ? s.replace(/ /g, "␣") : s;
}

export function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
