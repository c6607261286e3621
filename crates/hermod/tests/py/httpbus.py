"""Helpers for the hermod HTTP-front tests (agent-bus, SSE-interop, v1).

Every script gets the daemon's base URL in ``HERMOD_URL`` (and the Unix socket
in ``HERMOD_SOCKET``, see :mod:`common`).  Everything here is bounded: HTTP
calls have timeouts, stream readers run in threads that notice a stop request
within about a second (the tests run the daemon with ``--sse-keepalive 1``)
and are joined with a deadline.

* :func:`base_url`, :func:`client` -- the daemon URL and an ``httpx.Client``.
* :func:`expect_json` -- status + JSON body check with a clear failure.
* :func:`crossing_text` -- the agent-bus crossing rule for bodies.
* Receivers, each a thread that records normalised messages
  (``{"from", "channel", "to", "seq", "id", "body"|"msg", "raw"}``):
  :class:`SSEReader` (raw SSE events, used for v1 and interop streams),
  :class:`WSReader` (v1 WebSocket), :class:`UnixReader` (registered raw
  Unix connection), :class:`RecvPoller` (agent-bus ``/recv`` long-poll loop).
"""
import json
import os
import threading
import time

import httpx
from httpx_sse import connect_sse
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
import websockets.sync.client as ws_client

from common import RawConn, TestFailure, check, fail, socket_path

HTTP_TIMEOUT = 10.0
# keep-alive comments come every second in the tests; ten silent seconds on a
# stream means the daemon stopped sending them
STREAM_READ_TIMEOUT = 10.0
LONG_POLL_TIMEOUT = 45.0  # > the daemon's 30 s default hold


def base_url():
    url = os.environ.get("HERMOD_URL")
    if not url:
        fail("HERMOD_URL is not set")
    return url.rstrip("/")


def ws_url(path):
    return "ws" + base_url()[len("http"):] + path


def client(timeout=HTTP_TIMEOUT, **kw):
    return httpx.Client(base_url=base_url(), timeout=timeout, **kw)


def compact(obj):
    """Compact JSON as serde_json writes it (no spaces, UTF-8 kept as is)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def crossing_text(body):
    """What an agent-bus ``msg`` shows for a body: the text of a text-only
    body, else the body's compact JSON."""
    if list(body.keys()) == ["text"] and isinstance(body["text"], str):
        return body["text"]
    return compact(body)


def describe(resp):
    text = resp.text
    if len(text) > 300:
        text = text[:300] + "...(%d chars)" % len(text)
    return "%s %s -> %d %s" % (resp.request.method, _short_url(resp.request.url),
                               resp.status_code, text)


def _short_url(url):
    s = str(url)
    return s if len(s) <= 200 else s[:200] + "..."


def expect_json(resp, status, context):
    """The response has ``status`` and a JSON body; returns the parsed body."""
    check(resp.status_code == status,
          "%s: expected HTTP %d, got %s" % (context, status, describe(resp)))
    ctype = resp.headers.get("content-type", "")
    check("application/json" in ctype,
          "%s: expected a JSON content-type, got %r (%s)" % (context, ctype, describe(resp)))
    try:
        return resp.json()
    except ValueError as e:
        fail("%s: body is not JSON (%s): %s" % (context, e, describe(resp)))


def expect_error(resp, status, context, code=None):
    """An error response: ``status`` and ``{"error": str, "code": str}``."""
    body = expect_json(resp, status, context)
    check(isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]
          and isinstance(body.get("code"), str),
          "%s: error body is not {\"error\": str, \"code\": str}: %r" % (context, body))
    if code is not None:
        check(body["code"] == code,
              "%s: expected error code %r, got %r (%r)" % (context, code, body["code"], body))
    return body


# ── normalising delivered messages ────────────────────────────────────────

def norm_frame(obj, source):
    """A v1 SSE / v1 WebSocket / Unix ``message`` frame."""
    check(isinstance(obj, dict), "%s: delivered item is not an object: %r" % (source, obj))
    return {
        "from": obj.get("from"),
        "channel": obj.get("channel"),
        "to": obj.get("to"),
        "seq": obj.get("seq"),
        "id": obj.get("id"),
        "body": obj.get("body"),
        "raw": obj,
    }


def norm_interop(obj, source):
    """An SSE-interop event or /poll item: body fields + ``_meta``."""
    check(isinstance(obj, dict), "%s: delivered item is not an object: %r" % (source, obj))
    meta = obj.get("_meta")
    check(isinstance(meta, dict), "%s: item has no _meta object: %r" % (source, obj))
    body = {k: v for k, v in obj.items() if k != "_meta"}
    return {
        "from": meta.get("from"),
        "channel": meta.get("channel"),
        "to": meta.get("to"),
        "seq": meta.get("seq"),
        "id": meta.get("id"),
        "ts": meta.get("ts"),
        "body": body,
        "raw": obj,
    }


def norm_recv(obj, source):
    """An agent-bus /recv item."""
    check(isinstance(obj, dict), "%s: delivered item is not an object: %r" % (source, obj))
    return {
        "from": obj.get("from"),
        "channel": obj.get("channel"),
        "to": None,
        "seq": obj.get("seq"),
        "id": obj.get("id"),
        "ts": obj.get("ts"),
        "msg": obj.get("msg"),
        "raw": obj,
    }


def is_interop_notice(rec):
    """The bus's own ``subscriber_connected`` notice."""
    body = rec.get("body")
    if isinstance(body, dict) and body.get("type") == "subscriber_connected":
        return True
    msg = rec.get("msg")
    return rec.get("from") == "interop" and isinstance(msg, str) and "subscriber_connected" in msg


# ── receivers ─────────────────────────────────────────────────────────────

class Receiver:
    """A reader thread collecting records; ``ready`` is set once it listens."""

    kind = "?"

    def __init__(self, label):
        self.label = label
        self.records = []
        self.error = None
        self.ready = threading.Event()
        self.done = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=label, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _main(self):
        try:
            self._run()
        except TestFailure as e:
            if not self._stop.is_set():
                self.error = str(e)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            if not self._stop.is_set():
                self.error = "%s: %s" % (type(e).__name__, e)
        finally:
            self.ready.set()
            self.done.set()

    def _add(self, rec):
        with self._lock:
            self.records.append(rec)

    def snapshot(self):
        with self._lock:
            return list(self.records)

    def wait_ready(self, timeout=10.0):
        if not self.ready.wait(timeout):
            fail("%s: not listening after %.0fs" % (self.label, timeout))
        if self.error:
            fail("%s: %s" % (self.label, self.error))

    def check_alive(self):
        if self.error:
            fail("%s: %s" % (self.label, self.error))
        if self.done.is_set() and not self._stop.is_set():
            fail("%s: stream ended unexpectedly" % self.label)

    def wait_for(self, pred, count, timeout, what):
        """Wait until at least ``count`` records match ``pred``; return them."""
        deadline = time.monotonic() + timeout
        while True:
            got = [r for r in self.snapshot() if pred(r)]
            if len(got) >= count:
                return got
            self.check_alive()
            if time.monotonic() >= deadline:
                fail("%s: timed out after %.1fs waiting for %s (have %d of %d)"
                     % (self.label, timeout, what, len(got), count))
            time.sleep(0.02)

    def stop(self, timeout=5.0):
        self._stop.set()
        self._close()
        self._thread.join(timeout)

    def _close(self):
        pass


class SSEReader(Receiver):
    """One SSE stream (httpx + httpx-sse) in a thread.

    ``events`` gets every event as ``(id, data_text)``; ``keepalives`` counts
    comment lines.  ``normalise(obj)`` (if given) turns an event's JSON into a
    record for ``records``.
    """

    kind = "sse"

    def __init__(self, path, label, params=None, headers=None, normalise=None,
                 socket_options=None, base=None):
        super().__init__(label)
        # another node's URL (the NATS tests run several), else HERMOD_URL
        self.base = base
        self.socket_options = socket_options
        self.path = path
        self.params = params or {}
        self.headers = dict(headers or {})
        self.normalise = normalise
        self.events = []
        self.keepalives = 0
        self.status = None
        self.content_type = None
        self.error_body = None
        # while set, the reader stops pulling bytes (TCP backpressure on the
        # daemon's side of the stream)
        self.hold = threading.Event()

    def _run(self):
        timeout = httpx.Timeout(HTTP_TIMEOUT, read=STREAM_READ_TIMEOUT)
        transport = httpx.HTTPTransport(socket_options=self.socket_options)
        with httpx.Client(base_url=self.base or base_url(), timeout=timeout,
                          transport=transport) as c:
            with connect_sse(c, "GET", self.path, params=self.params,
                             headers=dict(self.headers)) as es:
                resp = es.response
                self.status = resp.status_code
                self.content_type = resp.headers.get("content-type", "")
                if resp.status_code != 200:
                    resp.read()
                    self.error_body = resp.text
                    raise TestFailure("GET %s %r -> HTTP %d %s" % (
                        self.path, self.params, resp.status_code, resp.text[:300]))
                if "text/event-stream" not in self.content_type:
                    raise TestFailure("GET %s: content-type %r, not text/event-stream"
                                      % (self.path, self.content_type))
                self.ready.set()
                decoder = SSEDecoder()
                lines = SSELineDecoder()
                has_data = has_id = False
                for chunk in resp.iter_text():
                    while self.hold.is_set() and not self._stop.is_set():
                        time.sleep(0.02)
                    for line in lines.decode(chunk):
                        if self._stop.is_set():
                            return
                        line = line.rstrip("\n")
                        if line.startswith(":"):
                            self.keepalives += 1
                            continue
                        if line.startswith("data"):
                            has_data = True
                        if line.startswith("id"):
                            has_id = True
                        sse = decoder.decode(line)
                        # httpx-sse 0.4.3 dispatches an empty event on the
                        # blank line after a comment once it has seen an id,
                        # and carries the last id into events without one;
                        # the SSE spec dispatches nothing without data lines,
                        # and here an event's id is its own ``id:`` line
                        if sse is not None and has_data:
                            self._event(sse, sse.id if has_id else None)
                        if sse is not None:
                            has_data = has_id = False
                    if self._stop.is_set():
                        return
                if not self._stop.is_set():
                    raise TestFailure("the daemon ended the stream")

    def _event(self, sse, event_id):
        with self._lock:
            self.events.append((event_id, sse.data))
        try:
            obj = json.loads(sse.data)
        except ValueError:
            raise TestFailure("event data is not JSON: %r" % sse.data[:300])
        if self.normalise is not None:
            rec = self.normalise(obj, self.label)
            rec["event_id"] = event_id
            self._add(rec)

    def event_snapshot(self):
        with self._lock:
            return list(self.events)


def v1_stream(agent, label=None, channel=None, after=None, last_event_id=None, base=None):
    params = {}
    if channel is not None:
        params["channel"] = channel
    if after is not None:
        params["after"] = str(after)
    headers = {}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return SSEReader("/v1/agents/%s/stream" % agent, label or "v1-sse(%s)" % agent,
                     params=params, headers=headers, normalise=norm_frame, base=base)


def interop_stream(agent, label=None, channel=None, last_event_id=None, socket_options=None,
                   base=None):
    params = {"agent": agent}
    if channel is not None:
        params["channel"] = channel
    headers = {}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return SSEReader("/subscribe", label or "subscribe(%s)" % agent,
                     params=params, headers=headers, normalise=norm_interop,
                     socket_options=socket_options, base=base)


class WSReader(Receiver):
    """A v1 WebSocket (``websockets`` sync client) read in a thread.

    ``start()`` connects and round-trips a ping first, so once it returns
    the agent is connected (known) on the daemon.  Non-message frames go to
    ``others``.
    """

    kind = "ws"

    def __init__(self, agent, label=None, channel=None):
        super().__init__(label or "v1-ws(%s)" % agent)
        path = "/v1/agents/%s/ws" % agent
        if channel is not None:
            path += "?channel=%s" % channel
        self.url = ws_url(path)
        self.others = []
        self.conn = None

    def start(self):
        self.conn = ws_client.connect(self.url, open_timeout=HTTP_TIMEOUT, max_size=None,
                                      close_timeout=2, legacy=True)
        self.conn.send(json.dumps({"type": "ping"}))
        deadline = time.monotonic() + HTTP_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                fail("%s: no pong within %.0fs" % (self.label, HTTP_TIMEOUT))
            try:
                text = self.conn.recv(timeout=remaining)
            except TimeoutError:
                continue
            if self._frame(text) == "pong":
                break
        self.ready.set()
        return super().start()

    def _frame(self, text):
        check(isinstance(text, str), "%s: binary WebSocket frame: %r" % (self.label, text[:100]))
        try:
            obj = json.loads(text)
        except ValueError:
            raise TestFailure("%s: frame is not JSON: %r" % (self.label, text[:300]))
        if isinstance(obj, dict) and obj.get("type") == "message":
            self._add(norm_frame(obj, self.label))
        else:
            with self._lock:
                self.others.append(obj)
        return obj.get("type") if isinstance(obj, dict) else None

    def _run(self):
        while not self._stop.is_set():
            try:
                text = self.conn.recv(timeout=1.0)
            except TimeoutError:
                continue
            self._frame(text)

    def send(self, obj):
        self.conn.send(json.dumps(obj, ensure_ascii=False))

    def _close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                pass


class UnixReader(Receiver):
    """A raw registered Unix-socket connection read in a thread."""

    kind = "unix"

    def __init__(self, agent, label=None, channel=None):
        super().__init__(label or "unix(%s)" % agent)
        self.agent = agent
        self.channel = channel
        self.conn = None
        self.others = []

    def start(self):
        self.conn = RawConn(socket_path())
        self.conn.register(self.agent, channel=self.channel, context=self.label + " register")
        self.ready.set()
        return super().start()

    def _run(self):
        for f in list(self.conn.pushed):
            self._frame(f)
        self.conn.pushed = []
        while not self._stop.is_set():
            f = self.conn.recv_or_none(1.0)
            if f is not None:
                self._frame(f)

    def _frame(self, f):
        if f.get("type") == "message":
            self._add(norm_frame(f, self.label))
        else:
            with self._lock:
                self.others.append(f)

    def _close(self):
        # the thread notices the stop flag within a second; closing the
        # socket under it could make its last read fail noisily
        pass

    def stop(self, timeout=5.0):
        super().stop(timeout)
        if self.conn is not None:
            self.conn.close()


class RecvPoller(Receiver):
    """The agent-bus client loop: ``GET /recv?block=true`` with ``since``
    advanced to max(largest ts received, now) after every reply.

    The first call is ``block=false`` (it makes the agent known); ``ready``
    is set once it returned.  ``replies`` keeps every reply.
    """

    kind = "recv"

    def __init__(self, agent, label=None, channel=None, since=0.0, base=None):
        super().__init__(label or "recv(%s)" % agent)
        self.base = base
        self.agent = agent
        self.channel = channel
        self.since = since
        self.replies = []
        self._http = None

    def _run(self):
        with httpx.Client(base_url=self.base or base_url(), timeout=LONG_POLL_TIMEOUT) as c:
            self._http = c
            block = "false"
            while not self._stop.is_set():
                params = {"to": self.agent, "since": repr(self.since), "block": block}
                if self.channel is not None:
                    params["channel"] = self.channel
                resp = c.get("/recv", params=params)
                if self._stop.is_set():
                    return
                body = expect_json(resp, 200, "%s GET /recv" % self.label)
                check(isinstance(body, dict) and isinstance(body.get("messages"), list)
                      and isinstance(body.get("now"), float),
                      "%s: /recv reply is not {messages: [...], now: float}: %r"
                      % (self.label, body))
                with self._lock:
                    self.replies.append(body)
                newest = self.since
                for m in body["messages"]:
                    self._add(norm_recv(m, self.label))
                    if isinstance(m.get("ts"), (int, float)):
                        newest = max(newest, m["ts"])
                self.since = max(newest, body["now"])
                block = "true"
                self.ready.set()

    def stop(self, timeout=0.0):
        # a held long-poll cannot be interrupted from here; the thread is a
        # daemon thread and ends at its next reply (at most the daemon's hold
        # plus LONG_POLL_TIMEOUT) or with the process
        self._stop.set()
        if timeout:
            self._thread.join(timeout)


def stop_all(receivers):
    for r in receivers:
        r._stop.set()
    for r in receivers:
        try:
            r.stop()
        except Exception:  # noqa: BLE001
            pass
