// The bearer token of a service started with --api-token: asked for once when a request gets 401, kept in this
// tab's sessionStorage (gone when the tab closes, never in a URL or a cookie), sent as `Authorization: Bearer`.

const KEY = "attribute-ray-token";
let pending = null; // one prompt for all the requests that got 401 together

export function authHeaders() {
  const token = sessionStorage.getItem(KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** Show the token dialog (saying why) and resolve once a token is entered; the same promise while it is open. */
export function askToken(wrong) {
  if (pending) return pending;
  const dialog = document.getElementById("token-dialog");
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  document.getElementById("token-why").textContent = wrong
    ? "The token was not accepted; enter it again."
    : "This service needs an API token (the one it was started with, --api-token).";
  pending = new Promise((resolve) => {
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      sessionStorage.setItem(KEY, token);
      input.value = "";
      dialog.close();
      pending = null;
      resolve();
    }, { once: true });
  });
  if (!dialog.open) dialog.showModal();
  input.focus();
  return pending;
}

/** fetch() with the token; on 401 ask for it (again, if one was sent) and retry until it is accepted. */
export async function authFetch(url, init = {}) {
  for (;;) {
    const sent = sessionStorage.getItem(KEY);
    const res = await fetch(url, { ...init, headers: { ...(init.headers || {}), ...authHeaders() } });
    if (res.status !== 401) return res;
    if (sessionStorage.getItem(KEY) === sent) await askToken(Boolean(sent));  // else another request got a new one
  }
}
