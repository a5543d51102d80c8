// The console's only script. Admin actions: ask for confirmation, then POST to the admin endpoint with
// the token from the page's field as a bearer header. The token is never stored (no cookie, no storage).
"use strict";

async function sendAction(form) {
  const out = document.getElementById("action-result");
  const token = document.getElementById("admin-token");
  if (!window.confirm(form.dataset.confirm)) return;
  const body = {};
  for (const [name, value] of new FormData(form)) body[name] = value;
  const response = await fetch(form.action, {
    method: "POST",
    headers: {"Authorization": "Bearer " + (token ? token.value : ""), "Content-Type": "application/json"},
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  out.textContent = response.ok ? "done: " + form.dataset.done
    : "refused (" + response.status + "): " + (answer.detail || response.statusText);
  out.className = response.ok ? "ok" : "error";
  if (response.ok) window.setTimeout(() => window.location.reload(), 800);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form.admin-action")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      sendAction(form);
    });
  }
});
