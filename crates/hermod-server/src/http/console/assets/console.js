// The hermod console's only script (served by hermod, no inline code).
// The live feed: new rows arrive over SSE as server-rendered, escaped
// HTML; badge changes as {seq, badge}. Pausing holds new rows (at most
// MAX_HELD) until resumed. Summary cards refresh themselves (data-refresh).
// Everything else is plain links and forms.
"use strict";

const MAX_ROWS = 200;
const MAX_HELD = 200;

function startFeed(tbody) {
  const status = document.getElementById("feed-status");
  const pause = document.getElementById("pause");
  let paused = false;
  let held = [];
  const show = (text) => { if (status) status.textContent = text; };

  function addRow(html) {
    const tmp = document.createElement("tbody");
    tmp.innerHTML = html;
    const row = tmp.firstElementChild;
    if (!row) return;
    const old = document.getElementById(row.id);
    if (old) old.remove();
    row.classList.add("fresh");
    tbody.insertBefore(row, tbody.firstChild);
    while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
  }

  function setBadge(seq, badge) {
    const row = document.getElementById("m-" + seq);
    if (!row) return;
    const cell = row.querySelector(".state");
    if (!cell) return;
    const span = document.createElement("span");
    span.className = "badge b-" + badge;
    span.textContent = badge;
    cell.replaceChildren(span);
  }

  const apply = (ev) => {
    if (ev.kind === "msg") addRow(ev.data);
    else if (ev.kind === "badge") setBadge(ev.data.seq, ev.data.badge);
  };

  function handle(ev) {
    if (paused) {
      held.push(ev);
      if (held.length > MAX_HELD) held.shift();
      show("paused · " + held.length + " update(s) waiting");
    } else {
      apply(ev);
    }
  }

  if (pause) {
    pause.addEventListener("click", () => {
      paused = !paused;
      pause.textContent = paused ? "resume" : "pause";
      pause.setAttribute("aria-pressed", String(paused));
      if (!paused) {
        held.forEach(apply);
        held = [];
        show("live");
      } else {
        show("paused");
      }
    });
  }

  const source = new EventSource(tbody.dataset.src);
  source.addEventListener("open", () => show(paused ? "paused" : "live"));
  source.addEventListener("error", () => show("reconnecting…"));
  source.addEventListener("msg", (e) => handle({ kind: "msg", data: e.data }));
  source.addEventListener("badge", (e) => {
    try { handle({ kind: "badge", data: JSON.parse(e.data) }); } catch (_) { /* ignore */ }
  });
  source.addEventListener("lagged", () => { if (!paused) location.reload(); });
}

// An element with an id and data-refresh="SECONDS" is fetched again from
// the same URL every SECONDS and its content swapped in (server-rendered,
// escaped HTML; a page that answers anything but 200 stops it).
function startRefresh(el) {
  const every = Number(el.dataset.refresh) * 1000;
  if (!el.id || !(every > 0)) return;
  const timer = setInterval(async () => {
    if (document.hidden) return;
    try {
      // Marked: a background refresh does not keep the session alive.
      const r = await fetch(location.href, {
        credentials: "same-origin",
        headers: { "X-Console-Refresh": "1" },
      });
      if (r.status !== 200) { clearInterval(timer); return; }
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      const fresh = doc.getElementById(el.id);
      if (fresh) el.innerHTML = fresh.innerHTML;
    } catch (_) { /* the next tick tries again */ }
  }, every);
}

document.addEventListener("DOMContentLoaded", () => {
  const tbody = document.getElementById("feed");
  if (tbody && tbody.dataset.src) startFeed(tbody);
  document.querySelectorAll("[data-refresh]").forEach(startRefresh);
});
