"""The hermes_events cross-process relay (PROTOCOLS section 4) with the real
``websockets`` client.

Proves:

(a) Tokens: ``/api/pub`` and ``/api/events`` refuse the WebSocket handshake
    with HTTP 401 without a token, with a wrong one, with an empty one and
    with one differing only in case (``websockets.exceptions.InvalidStatus``,
    status 401).
(b) On ``/api/pub?token=T&channel=gateway``, interleaved garbage text frames
    (not JSON, arrays, ``{}``, relay frames with no/ill-typed topic or
    envelope, JSON-RPC frames with missing params / type, other methods, an
    invalid topic, JSON scalars, an empty frame) and binary frames (one of
    them holding a valid relay frame) are ignored: an SSE subscriber of
    ``GET /v1/events?pattern=**&channel=gateway`` gets EXACTLY the valid
    events, in order:
    * a relay frame is published as its topic with the envelope as is
      (body == envelope, original ``ts`` 1234.5 and ``src`` kept); one
      without ``ts``/``src`` gets them stamped (bus time, first segment);
    * a JSON-RPC ``event`` is published as ``tui.<type>`` with
      ``session_id`` and the payload's keys flattened in and ``type``,
      ``ts``, ``src`` stamped (also without a payload);
    and each message says ``channel: gateway``, ``topic`` == body ``type``
    (where not overridden), SSE ``id`` == seq, seqs increasing.
(c) The pub connection stays open through the garbage: a final valid frame
    sent after all of it arrives, and a WebSocket ping is answered.
(d) An ``/api/events`` listener on the channel gets every TEXT frame as is
    (string-equal, in order, garbage included) and no binary frame.
(e) Channels are separate: a second pub connection on another channel
    reaches that channel's SSE subscriber and ``/api/events`` listener and
    neither of the ``gateway`` ones.
(f) Without ``channel``, ``/api/pub`` publishes on ``gateway`` and
    ``/api/events`` listens to ``gateway``.
"""
import json
import os
import sys
import threading
import time
import urllib.parse

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import websockets  # noqa: E402
import websockets.exceptions  # noqa: E402
import websockets.sync.client as ws_client  # noqa: E402

from common import check, fail, is_float, is_int, log, run, unique_name  # noqa: E402
from httpbus import SSEReader, norm_frame, stop_all, ws_url  # noqa: E402

OPEN_TIMEOUT = 10.0
SETTLE = 1.0


def token():
    t = os.environ.get("HERMOD_RELAY_TOKEN")
    if not t:
        fail("HERMOD_RELAY_TOKEN is not set (the daemon runs with --relay-token)")
    return t


def relay_url(path, tok=None, channel=None):
    params = {}
    if tok is not None:
        params["token"] = tok
    if channel is not None:
        params["channel"] = channel
    query = urllib.parse.urlencode(params)
    return ws_url(path + ("?" + query if query else ""))


def connect(url):
    return ws_client.connect(url, open_timeout=OPEN_TIMEOUT, close_timeout=2,
                             max_size=None, legacy=True)


# ── (a) tokens ────────────────────────────────────────────────────────────

def expect_401(path, tok, what):
    url = relay_url(path, tok, "gateway")
    try:
        conn = connect(url)
    except websockets.exceptions.InvalidStatus as e:
        status = e.response.status_code
        check(status == 401, "%s: handshake refused with HTTP %d, expected 401 (body %r)"
              % (what, status, bytes(e.response.body or b"")[:200]))
        return
    except Exception as e:  # noqa: BLE001
        fail("%s: expected the handshake to fail with 401, got %s: %s"
             % (what, type(e).__name__, e))
    conn.close()
    fail("%s: the WebSocket handshake succeeded (expected HTTP 401)" % what)


def test_tokens(tok):
    for path in ("/api/pub", "/api/events"):
        expect_401(path, None, "%s without a token" % path)
        expect_401(path, tok + "-wrong", "%s with a wrong token" % path)
        expect_401(path, "", "%s with an empty token" % path)
        if tok.upper() != tok:
            expect_401(path, tok.upper(), "%s with the token in upper case" % path)
        else:
            expect_401(path, tok.lower() + "x", "%s with a near-miss token" % path)
    log("ok: /api/pub and /api/events refuse missing/wrong tokens with 401")


# ── /api/events listener ──────────────────────────────────────────────────

class Listener:
    """An ``/api/events`` WebSocket read in a thread: ``frames`` gets every
    frame as received (str for text, bytes for binary)."""

    def __init__(self, tok, channel, label):
        self.label = label
        self.conn = connect(relay_url("/api/events", tok, channel))
        self.frames = []
        self.error = None
        self.closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=label, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                try:
                    f = self.conn.recv(timeout=0.5)
                except TimeoutError:
                    continue
                with self._lock:
                    self.frames.append(f)
        except websockets.exceptions.ConnectionClosed as e:
            if not self._stop.is_set():
                self.error = "connection closed by the daemon: %s" % e
                self.closed = True
        except Exception as e:  # noqa: BLE001
            if not self._stop.is_set():
                self.error = "%s: %s" % (type(e).__name__, e)

    def snapshot(self):
        with self._lock:
            return list(self.frames)

    def check_alive(self):
        if self.error:
            fail("%s: %s" % (self.label, self.error))

    def wait_count(self, n, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            got = self.snapshot()
            if len(got) >= n:
                return got
            self.check_alive()
            if time.monotonic() >= deadline:
                fail("%s: timed out after %.1fs waiting for %s (have %d of %d frames: %r)"
                     % (self.label, timeout, what, len(got), n, got[:40]))
            time.sleep(0.02)

    def stop(self):
        self._stop.set()
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass
        self._thread.join(5)


def sync_listener(pub, listener, tag):
    """Make sure ``listener`` is subscribed to the fan-out before the real
    frames: send ``sync`` text frames one at a time until one arrives.
    Returns the number of frames the listener has then (all sync frames).
    A sync frame is garbage for the relay: it must not be published."""
    for i in range(50):
        text = "%s-sync-%d (not json)" % (tag, i)
        pub.send(text)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            got = listener.snapshot()
            if text in got:
                check(got[-1] == text, "%s: frames after the sync frame: %r" % (listener.label, got))
                for g in got:
                    check(isinstance(g, str) and g.startswith("%s-sync-" % tag),
                          "%s: unexpected frame before the test frames: %r" % (listener.label, g))
                return len(got)
            listener.check_alive()
            time.sleep(0.01)
    fail("%s: no sync frame arrived on /api/events within 25 s" % listener.label)


# ── the frames ────────────────────────────────────────────────────────────

def rpc(params, method="event"):
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params})


START_ENVELOPE = {"type": "gateway.agent.start", "ts": 1234.5, "src": "gateway-orig", "agent": "x"}


def build_frames(marker):
    """(kind, frame, expected) triples in sending order.  ``kind`` is
    ``text`` or ``binary``; ``expected`` is None for frames that must not be
    published, else ``(topic, checker)``."""
    frames = []

    def garbage(text):
        frames.append(("text", text, None))

    def binary(data):
        frames.append(("binary", data, None))

    def valid(text, topic, checker):
        frames.append(("text", text, (topic, checker)))

    garbage("not json")

    # (1) relay frame with a full envelope: published as is
    def check_start(body, msg):
        check(body == START_ENVELOPE,
              "relay frame: body must be the envelope as is (ts 1234.5 and src kept); "
              "expected %r, got %r" % (START_ENVELOPE, body))
    valid(json.dumps({"_bus_relay": True, "topic": "gateway.agent.start",
                      "envelope": START_ENVELOPE}),
          "gateway.agent.start", check_start)

    garbage("[1,2]")
    garbage("{}")
    binary(b"\x00\x01\x02 binary garbage \xff")
    garbage('{"_bus_relay":true}')
    garbage('{"_bus_relay":true,"topic":5,"envelope":{}}')

    # (2) JSON-RPC event: tui.<type>, session_id + payload flattened, stamped
    def check_tool(body, msg):
        want = {"tool": "bash", "session_id": "s1", "type": "tui.tool.start", "src": "tui"}
        for k, v in want.items():
            check(body.get(k) == v, "JSON-RPC event: body[%r] is %r, expected %r (body %r)"
                  % (k, body.get(k), v, body))
        check(set(body) == set(want) | {"ts"},
              "JSON-RPC event: body keys %r, expected exactly %r" % (sorted(body), sorted(set(want) | {"ts"})))
        check_bus_ts(body, msg, "JSON-RPC event")
    valid(rpc({"type": "tool.start", "session_id": "s1", "payload": {"tool": "bash"}}),
          "tui.tool.start", check_tool)

    garbage('{"jsonrpc":"2.0","method":"event"}')  # missing params
    garbage(rpc({}))  # params without type
    garbage(rpc({"type": "", "session_id": "s1"}))  # empty type
    garbage(rpc({"session_id": "s1", "payload": {"tool": "bash"}}))  # no type
    garbage(rpc({"type": "tool.start", "session_id": "s1", "payload": [1]}))  # payload not an object
    garbage(rpc({"type": "tool.start", "session_id": "s1"}, method="notify"))  # other method
    garbage(json.dumps({"jsonrpc": "1.0", "method": "event", "params": {"type": "x"}}))
    garbage('{"_bus_relay":true,"topic":"gateway.x","envelope":[1]}')
    garbage('{"_bus_relay":true,"topic":"gateway.x"}')
    garbage('{"_bus_relay":false,"topic":"gateway.x","envelope":{}}')
    garbage('{"_bus_relay":"true","topic":"gateway.x","envelope":{}}')
    garbage('{"_bus_relay":true,"topic":"bad..topic","envelope":{"m":1}}')  # invalid topic
    garbage('{"_bus_relay":true,"topic":"","envelope":{"m":1}}')
    garbage('"just a string"')
    garbage("null")
    garbage("42")
    garbage("")
    garbage('{"_bus_relay":true,"topic":"gateway.trunc","envelope":{')  # truncated JSON
    # a valid relay frame sent as BINARY: ignored (only text frames count)
    binary(json.dumps({"_bus_relay": True, "topic": "gateway.binary",
                       "envelope": {"m": marker}}).encode())

    # (3) relay frame whose envelope lacks ts/src/type: stamped by the bus
    def check_end(body, msg):
        check(body.get("agent") == "x" and body.get("m") == marker,
              "relay frame without stamps: payload keys lost: %r" % body)
        check(body.get("type") == "gateway.agent.end",
              "relay frame without stamps: type %r, expected the topic" % body.get("type"))
        check(body.get("src") == "gateway",
              "relay frame without stamps: src %r, expected 'gateway'" % body.get("src"))
        check(set(body) == {"agent", "m", "type", "ts", "src"},
              "relay frame without stamps: body keys %r" % sorted(body))
        check_bus_ts(body, msg, "relay frame without stamps")
    valid(json.dumps({"_bus_relay": True, "topic": "gateway.agent.end",
                      "envelope": {"agent": "x", "m": marker}}),
          "gateway.agent.end", check_end)

    garbage('{"foo":"bar","params":{"type":"x"}}')

    # (4) JSON-RPC event without a payload
    def check_idle(body, msg):
        check(body.get("session_id") == "s2" and body.get("type") == "tui.session.idle"
              and body.get("src") == "tui" and set(body) == {"session_id", "type", "ts", "src"},
              "JSON-RPC event without payload: body %r" % body)
        check_bus_ts(body, msg, "JSON-RPC event without payload")
    valid(rpc({"type": "session.idle", "session_id": "s2"}), "tui.session.idle", check_idle)

    return frames


def check_bus_ts(body, msg, what):
    ts = body.get("ts")
    check(is_float(ts), "%s: stamped ts %r is not a float" % (what, ts))
    check(abs(ts - time.time()) < 60,
          "%s: stamped ts %r is not the bus's current time (now %r)" % (what, ts, time.time()))


def check_messages(recs, expected, channel, what):
    """``recs`` (normalised SSE records) are exactly ``expected``
    ((topic, checker) pairs), in order."""
    got_topics = [r["raw"].get("topic") for r in recs]
    want_topics = [t for t, _ in expected]
    check(got_topics == want_topics,
          "%s: the SSE subscriber got topics %r, expected exactly %r (garbage must be ignored, "
          "valid frames published in order)" % (what, got_topics, want_topics))
    last_seq = 0
    for rec, (topic, checker) in zip(recs, expected):
        raw = rec["raw"]
        check(raw.get("type") == "message", "%s: event data is not a message frame: %r" % (what, raw))
        check(rec["channel"] == channel,
              "%s: %s arrived with channel %r, expected %r" % (what, topic, rec["channel"], channel))
        check(is_int(rec["seq"]) and rec["seq"] > last_seq,
              "%s: seq %r of %s is not increasing (previous %r)" % (what, rec["seq"], topic, last_seq))
        last_seq = rec["seq"]
        check(rec.get("event_id") == str(rec["seq"]),
              "%s: SSE id %r is not the seq %r" % (what, rec.get("event_id"), rec["seq"]))
        check(isinstance(rec["id"], str) and rec["id"], "%s: message id %r" % (what, rec["id"]))
        check(isinstance(rec["from"], str) and rec["from"],
              "%s: message 'from' %r is not a name" % (what, rec["from"]))
        check(isinstance(rec["body"], dict), "%s: body of %s is not an object: %r"
              % (what, topic, rec["body"]))
        checker(rec["body"], raw)


def main():
    tok = token()
    test_tokens(tok)

    marker = unique_name("relay")
    other_channel = unique_name("gw2")
    frames = build_frames(marker)
    final_text = json.dumps({"_bus_relay": True, "topic": "gateway.final",
                             "envelope": {"type": "gateway.final", "ts": 99.25, "src": "gateway",
                                          "m": marker}})

    def check_final(body, msg):
        want = {"type": "gateway.final", "ts": 99.25, "src": "gateway", "m": marker}
        check(body == want, "final relay frame: body %r, expected %r" % (body, want))

    receivers = []
    listeners = []
    conns = []
    try:
        sse = SSEReader("/v1/events", "SSE /v1/events?pattern=**&channel=gateway",
                        params={"pattern": "**", "channel": "gateway"},
                        normalise=norm_frame).start()
        receivers.append(sse)
        sse_other = SSEReader("/v1/events", "SSE /v1/events on %s" % other_channel,
                              params={"pattern": "**", "channel": other_channel},
                              normalise=norm_frame).start()
        receivers.append(sse_other)
        sse.wait_ready()
        sse_other.wait_ready()

        listener = Listener(tok, "gateway", "/api/events listener (gateway)")
        listeners.append(listener)
        listener_other = Listener(tok, other_channel, "/api/events listener (%s)" % other_channel)
        listeners.append(listener_other)

        pub = connect(relay_url("/api/pub", tok, "gateway"))
        conns.append(pub)
        pub_other = connect(relay_url("/api/pub", tok, other_channel))
        conns.append(pub_other)

        n_sync = sync_listener(pub, listener, "gw")
        n_sync_other = sync_listener(pub_other, listener_other, "other")

        # the garbage and valid frames, interleaved
        for kind, f, _ in frames:
            pub.send(f)  # str -> text frame, bytes -> binary frame
        # still open: a WebSocket ping is answered ...
        pong = pub.ping()
        if not pong.wait(5.0):
            fail("the /api/pub connection did not answer a ping after the garbage frames")
        # ... and a final valid frame is published
        pub.send(final_text)

        # the other channel: one valid event
        other_text = rpc({"type": "other.event", "session_id": "s9", "payload": {"m": marker}})
        pub_other.send(other_text)

        expected = [e for _, _, e in frames if e is not None] + [("gateway.final", check_final)]
        sse.wait_for(lambda r: True, len(expected), 15.0, "the %d valid events" % len(expected))
        sse_other.wait_for(lambda r: True, 1, 15.0, "the event on %s" % other_channel)
        texts = [f for k, f, _ in frames if k == "text"] + [final_text]
        listener.wait_count(n_sync + len(texts), 15.0, "every text frame")
        listener_other.wait_count(n_sync_other + 1, 15.0, "the text frame on %s" % other_channel)
        time.sleep(SETTLE)
        for r in receivers:
            r.check_alive()
        for lst in listeners:
            lst.check_alive()

        # (b)+(c): exactly the valid events, in order
        recs = sse.snapshot()
        check_messages(recs, expected, "gateway", "relay on gateway")
        log("ok: the SSE subscriber got exactly the %d valid events in order; garbage ignored"
            % len(expected))

        # (d): every text frame as is, in order, no binary
        got = listener.snapshot()[n_sync:]
        for g in got:
            check(isinstance(g, str), "%s: got a binary frame %r (binary frames are not text "
                  "frames and must not be fanned out)" % (listener.label, g[:100]))
        if got != texts:
            for i, (a, b) in enumerate(zip(got, texts)):
                if a != b:
                    fail("%s: frame %d is %r, expected %r as sent (got %d frames, sent %d text frames)"
                         % (listener.label, i, a, b, len(got), len(texts)))
            fail("%s: got %d frames, expected the %d text frames sent: extra/missing %r"
                 % (listener.label, len(got), len(texts),
                    got[len(texts):] if len(got) > len(texts) else texts[len(got):]))
        log("ok: /api/events got all %d text frames as is, in order, and no binary frame" % len(texts))

        # (e): channels are separate
        other_recs = sse_other.snapshot()
        check([r["raw"].get("topic") for r in other_recs] == ["tui.other.event"],
              "SSE on %s: expected exactly [tui.other.event], got %r"
              % (other_channel, [r["raw"] for r in other_recs]))
        ob = other_recs[0]["body"]
        check(other_recs[0]["channel"] == other_channel and isinstance(ob, dict)
              and ob.get("m") == marker and ob.get("session_id") == "s9",
              "SSE on %s: event %r" % (other_channel, other_recs[0]["raw"]))
        check(listener_other.snapshot()[n_sync_other:] == [other_text],
              "%s: expected exactly [%r], got %r"
              % (listener_other.label, other_text, listener_other.snapshot()[n_sync_other:]))
        check(all(r["raw"].get("topic") != "tui.other.event" for r in recs),
              "the gateway SSE subscriber got the other channel's event")
        check(other_text not in listener.snapshot(),
              "the gateway /api/events listener got the other channel's frame")
        log("ok: relay channels are separate (bus channel and /api/events fan-out)")

        # (c): the connection is still open
        pub.send("still-open (not json)")
        listener.wait_count(n_sync + len(texts) + 1, 10.0, "a frame after the final one")
        check(listener.snapshot()[-1] == "still-open (not json)",
              "/api/events: last frame %r" % listener.snapshot()[-1])
        log("ok: the /api/pub connection stayed open")

        # (f): without ``channel`` both endpoints use ``gateway``
        listener_default = Listener(tok, None, "/api/events listener (no channel)")
        listeners.append(listener_default)
        n_sync_default = sync_listener(pub, listener_default, "default")
        pub_default = connect(relay_url("/api/pub", tok))
        conns.append(pub_default)
        default_text = rpc({"type": "default.channel", "session_id": "s3",
                            "payload": {"m": marker}})
        pub_default.send(default_text)
        n_before = len(expected)
        sse.wait_for(lambda r: True, n_before + 1, 10.0, "the event from /api/pub without channel")
        listener_default.wait_count(n_sync_default + 1, 10.0, "the frame from /api/pub without channel")
        time.sleep(0.3)
        rec = sse.snapshot()[n_before:]
        check(len(rec) == 1 and rec[0]["raw"].get("topic") == "tui.default.channel"
              and rec[0]["channel"] == "gateway" and rec[0]["body"].get("m") == marker,
              "/api/pub without channel: the gateway SSE subscriber got %r, expected only "
              "tui.default.channel on channel gateway" % [r["raw"] for r in rec])
        check(listener_default.snapshot()[n_sync_default:] == [default_text],
              "/api/events without channel: got %r, expected exactly [%r]"
              % (listener_default.snapshot()[n_sync_default:], default_text))
        check(sse_other.snapshot()[1:] == [],
              "the %s SSE subscriber got %r" % (other_channel, [r["raw"] for r in sse_other.snapshot()[1:]]))
        log("ok: channel defaults to gateway on /api/pub and /api/events")
    finally:
        for c in conns:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        for lst in listeners:
            lst.stop()
        stop_all(receivers)


if __name__ == "__main__":
    run(main)
