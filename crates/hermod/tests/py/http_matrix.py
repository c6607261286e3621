"""Every protocol reaches every protocol: the 5 x 5 cross-protocol matrix.

Senders: Unix socket (``send`` frame), agent-bus (``POST /send``),
SSE-interop (``POST /broadcast?from=``), v1 HTTP (``POST /v1/messages``),
v1 WebSocket (``send`` frame).  Receivers: Unix socket (registered raw
connection), agent-bus (``/recv`` long-poll loop), SSE-interop
(``/subscribe``), v1 SSE (``/v1/agents/{n}/stream``), v1 WebSocket.

For each of the 25 sender x receiver pairs, with a fresh sender and a fresh
receiver name, the receiver is listening before anything is sent; the sender
sends 2-3 messages (unicode and emoji included) and each must arrive exactly
once, in order, with the right ``from``, ``channel``, ``to``, ``id``/``seq``
(as the send receipt said) and the body under the crossing rules:

* agent-bus ``msg`` "x" is the body ``{"text": "x"}`` everywhere else;
* a body ``{"text": "x"}`` is ``msg`` "x" on agent-bus, any other body
  (``{"text": "x", "n": 1}``, ``{"k": [1, 2], ...}``) is its compact JSON;
* interop events are the body's fields plus ``_meta`` (``from``, ``to`` --
  null for a broadcast --, ``channel``, ``seq``, ...), SSE ``id:`` = seq.

After everything arrived a 1 s settle catches duplicates.  The matrix then
runs again on a non-default channel for the 16 pairs without interop (the
documented interop endpoints have no channel parameter): the messages carry
that channel and the receivers listen only on it.

Last, the v1 WebSocket control frames: ``ack`` advances the cursor and gets
no reply, ``ping`` gets ``pong``.
"""
import json
import os
import sys
import time
import uuid

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import websockets.sync.client as ws_client  # noqa: E402

from common import RawConn, check, fail, is_int, log, run, unique_name  # noqa: E402
import httpbus  # noqa: E402
from httpbus import (  # noqa: E402
    RecvPoller, UnixReader, WSReader, crossing_text, expect_json, interop_stream,
    is_interop_notice, stop_all, v1_stream,
)

SENDERS = ["unix", "agentbus", "interop", "v1http", "v1ws"]
RECEIVERS = ["unix", "agentbus", "interop", "v1sse", "v1ws"]
SETTLE = 1.0
DELIVERY_TIMEOUT = 20.0


def payloads(sender_kind, tok):
    """What a sender sends: ("msg", text) for agent-bus, ("body", obj) else."""
    if sender_kind == "agentbus":
        return [
            ("msg", "héllo wörld 🎉 日本語 %s" % tok),
            ("msg", '{"looks":"like json","tok":"%s"}' % tok),
            ("msg", "two\nlines \"quoted\" \\ %s 🚀" % tok),
        ]
    return [
        ("body", {"text": "héllo 🎉 %s — ünïcödé" % tok}),
        ("body", {"text": "x 🚀 %s" % tok, "n": 1}),
        ("body", {"k": [1, 2], "tok": tok, "nested": {"é": "ü 🐍", "f": 1.5, "z": None}}),
    ]


def as_body(payload):
    kind, value = payload
    return {"text": value} if kind == "msg" else value


# ── senders ───────────────────────────────────────────────────────────────

def send_unix(http, sender, to, payload, channel):
    req = {"type": "send", "to": to, "from": sender, "id": str(uuid.uuid4()),
           "body": as_body(payload)}
    if channel is not None:
        req["channel"] = channel
    with RawConn() as c:
        reply = c.request(req, what="'sent' for unix send %s -> %s" % (sender, to))
    c.expect_type(reply, "sent", "unix send %s -> %s" % (sender, to))
    check(reply.get("id") == req["id"], "unix send: sent id %r != %r" % (reply.get("id"), req["id"]))
    return {"id": reply["id"], "seq": reply.get("seq")}


def send_agentbus(http, sender, to, payload, channel):
    kind, value = payload
    assert kind == "msg"
    req = {"from": sender, "to": to, "msg": value}
    if channel is not None:
        req["channel"] = channel
    ctx = "POST /send %s -> %s" % (sender, to)
    r = expect_json(http.post("/send", json=req), 200, ctx)
    check(r.get("ok") is True and isinstance(r.get("ts"), float) and is_int(r.get("seq"))
          and isinstance(r.get("id"), str) and r.get("channel") == (channel or "default"),
          "%s: reply is not {ok: true, ts, channel: %r, seq, id}: %r" % (ctx, channel or "default", r))
    return {"id": r["id"], "seq": r["seq"]}


def send_interop(http, sender, to, payload, channel):
    assert channel is None, "interop broadcasts stay on the default channel"
    ctx = "POST /broadcast?from=%s" % sender
    r = expect_json(http.post("/broadcast", params={"from": sender}, json=as_body(payload)), 200, ctx)
    check(r.get("delivered") is True and is_int(r.get("recipients")) and r["recipients"] >= 1
          and isinstance(r.get("id"), str) and is_int(r.get("seq")) and isinstance(r.get("ts"), float),
          "%s: reply is not {delivered: true, recipients >= 1, id, seq, ts}: %r" % (ctx, r))
    return {"id": r["id"], "seq": r["seq"], "broadcast": True}


def send_v1http(http, sender, to, payload, channel):
    req = {"from": sender, "to": to, "body": as_body(payload)}
    if channel is not None:
        req["channel"] = channel
    ctx = "POST /v1/messages %s -> %s" % (sender, to)
    r = expect_json(http.post("/v1/messages", json=req), 200, ctx)
    check(isinstance(r.get("id"), str) and is_int(r.get("seq")) and isinstance(r.get("ts"), float)
          and r.get("channel") == (channel or "default"),
          "%s: reply is not {id, seq, ts, channel: %r}: %r" % (ctx, channel or "default", r))
    return {"id": r["id"], "seq": r["seq"]}


class WSSender:
    """One v1 WebSocket per sender agent (``from`` defaults to the URL's agent)."""

    def __init__(self, agent, channel):
        path = "/v1/agents/%s/ws" % agent
        if channel is not None:
            path += "?channel=%s" % channel
        self.agent = agent
        self.conn = ws_client.connect(httpbus.ws_url(path), open_timeout=10, max_size=None,
                                      close_timeout=2, legacy=True)

    def send(self, to, payload, channel):
        frame = {"type": "send", "to": to, "body": as_body(payload)}
        if channel is not None:
            frame["channel"] = channel
        self.conn.send(json.dumps(frame, ensure_ascii=False))
        ctx = "v1 ws send %s -> %s" % (self.agent, to)
        deadline = time.monotonic() + 10
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                fail("%s: no 'sent' reply within 10s" % ctx)
            try:
                text = self.conn.recv(timeout=remaining)
            except TimeoutError:
                continue
            obj = json.loads(text)
            if obj.get("type") == "message":
                continue  # e.g. a broadcast of another pair reached this agent
            check(obj.get("type") == "sent", "%s: expected 'sent', got %r" % (ctx, obj))
            check(isinstance(obj.get("id"), str) and is_int(obj.get("seq"))
                  and isinstance(obj.get("ts"), float),
                  "%s: 'sent' is not {id, seq, ts}: %r" % (ctx, obj))
            return {"id": obj["id"], "seq": obj["seq"]}

    def close(self):
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass


# ── receivers ─────────────────────────────────────────────────────────────

def make_receiver(kind, name, channel):
    label = "%s receiver %s" % (kind, name)
    if kind == "unix":
        return UnixReader(name, label, channel=channel)
    if kind == "agentbus":
        return RecvPoller(name, label, channel=channel)
    if kind == "interop":
        assert channel is None
        return interop_stream(name, label)
    if kind == "v1sse":
        return v1_stream(name, label, channel=channel)
    if kind == "v1ws":
        return WSReader(name, label, channel=channel)
    raise ValueError(kind)


def check_record(pair, rec, payload, receipt, receiver_kind, receiver, channel):
    ctx = "%s: %s" % (pair, json.dumps(rec.get("raw"), ensure_ascii=False)[:400])
    want_channel = channel or "default"
    check(rec["channel"] == want_channel, "%s: channel %r, expected %r" % (ctx, rec["channel"], want_channel))
    check(rec["id"] == receipt["id"], "%s: id %r, the send receipt said %r" % (ctx, rec["id"], receipt["id"]))
    broadcast = receipt.get("broadcast", False)
    check(rec["seq"] == receipt["seq"],
          "%s: seq %r, the send receipt said %r" % (ctx, rec["seq"], receipt["seq"]))
    body = as_body(payload)
    if receiver_kind == "agentbus":
        want = crossing_text(body)
        check(rec["msg"] == want, "%s: msg %r, expected %r (crossing rule)" % (ctx, rec["msg"], want))
        check(isinstance(rec.get("ts"), float), "%s: ts is not a float" % ctx)
        return
    check(rec["body"] == body, "%s: body %r, expected %r" % (ctx, rec["body"], body))
    if receiver_kind == "interop":
        want_to = None if broadcast else receiver
        check(rec["to"] == want_to, "%s: _meta.to %r, expected %r" % (ctx, rec["to"], want_to))
        check(isinstance(rec.get("ts"), float), "%s: _meta.ts is not a float" % ctx)
        check(rec.get("event_id") == str(rec["seq"]),
              "%s: SSE id %r != _meta.seq %r" % (ctx, rec.get("event_id"), rec["seq"]))
        return
    check(rec["raw"].get("type") == "message", "%s: frame type is not 'message'" % ctx)
    check(isinstance(rec["raw"].get("ts"), float), "%s: ts is not a float" % ctx)
    if receiver_kind in ("v1sse", "v1ws"):
        want_to = "" if broadcast else receiver
        check(rec["to"] == want_to, "%s: to %r, expected %r" % (ctx, rec["to"], want_to))
    elif not broadcast:
        check(rec["to"] == receiver, "%s: to %r, expected %r" % (ctx, rec["to"], receiver))
    if receiver_kind == "v1sse":
        check(rec.get("event_id") == str(rec["seq"]),
              "%s: SSE id %r != seq %r" % (ctx, rec.get("event_id"), rec["seq"]))


def run_matrix(senders, receivers, channel):
    tag = channel or "default"
    pairs = []
    for s in senders:
        for r in receivers:
            tok = uuid.uuid4().hex[:10]
            pairs.append({
                "s_kind": s, "r_kind": r,
                "sender": unique_name("mx-%s" % s),
                "receiver": unique_name("mx-to-%s" % r),
                "payloads": payloads(s, tok),
                "label": "[%s] %s -> %s" % (tag, s, r),
            })
    readers = []
    ws_senders = []
    try:
        # every receiver listens before anything is sent
        for p in pairs:
            p["reader"] = make_receiver(p["r_kind"], p["receiver"], channel)
            p["reader"].start()
            readers.append(p["reader"])
        for p in pairs:
            p["reader"].wait_ready(15.0)
        log("%s: %d receivers listening" % (tag, len(pairs)))

        t0 = time.monotonic()
        with httpbus.client() as http:
            for p in pairs:
                p["receipts"] = []
                ws = None
                if p["s_kind"] == "v1ws":
                    ws = WSSender(p["sender"], channel)
                    ws_senders.append(ws)
                for payload in p["payloads"]:
                    if p["s_kind"] == "unix":
                        rc = send_unix(http, p["sender"], p["receiver"], payload, channel)
                    elif p["s_kind"] == "agentbus":
                        rc = send_agentbus(http, p["sender"], p["receiver"], payload, channel)
                    elif p["s_kind"] == "interop":
                        rc = send_interop(http, p["sender"], p["receiver"], payload, channel)
                    elif p["s_kind"] == "v1http":
                        rc = send_v1http(http, p["sender"], p["receiver"], payload, channel)
                    else:
                        rc = ws.send(p["receiver"], payload, channel)
                    p["receipts"].append(rc)
        log("%s: %d messages sent in %.2fs" % (tag, sum(len(p["payloads"]) for p in pairs),
                                             time.monotonic() - t0))

        def mine(p):
            return lambda rec: rec["from"] == p["sender"]

        deadline = time.monotonic() + DELIVERY_TIMEOUT
        for p in pairs:
            p["reader"].wait_for(mine(p), len(p["payloads"]), max(0.5, deadline - time.monotonic()),
                                 "%s: the %d messages" % (p["label"], len(p["payloads"])))
        log("%s: everything arrived %.2fs after the first send" % (tag, time.monotonic() - t0))
        time.sleep(SETTLE)

        for p in pairs:
            p["reader"].check_alive()
            recs = [r for r in p["reader"].snapshot() if r["from"] == p["sender"]]
            check(len(recs) == len(p["payloads"]),
                  "%s: expected exactly %d messages from %s, got %d (duplicates?): %r"
                  % (p["label"], len(p["payloads"]), p["sender"], len(recs),
                     [r["raw"] for r in recs]))
            for rec, payload, receipt in zip(recs, p["payloads"], p["receipts"]):
                check_record(p["label"], rec, payload, receipt, p["r_kind"], p["receiver"], channel)
            # nothing else may reach the receiver but other pairs' interop
            # broadcasts and the bus's subscriber_connected notices
            interop_senders = {q["sender"] for q in pairs if q["s_kind"] == "interop"}
            for rec in p["reader"].snapshot():
                if rec["from"] == p["sender"] or is_interop_notice(rec):
                    continue
                check(rec["from"] in interop_senders,
                      "%s: unexpected message %r" % (p["label"], rec["raw"]))
                check(rec["from"] != p["receiver"],
                      "%s: the receiver got its own message: %r" % (p["label"], rec["raw"]))
            log("ok %s" % p["label"])
    finally:
        stop_all(readers)
        for ws in ws_senders:
            ws.close()


def test_ws_control():
    """On a v1 WebSocket, ``ack`` advances the cursor and gets no reply;
    ``ping`` gets ``pong``."""
    me = unique_name("mx-wsctl")
    peer = unique_name("mx-wspeer")
    with httpbus.client() as http:
        receipt = send_v1http(http, peer, me, ("body", {"text": "ack me ✓"}), None)
        conn = ws_client.connect(httpbus.ws_url("/v1/agents/%s/ws" % me), open_timeout=10,
                                 close_timeout=2, legacy=True)
        try:
            first = json.loads(conn.recv(timeout=10))
            check(first.get("type") == "message" and first.get("seq") == receipt["seq"],
                  "v1 ws: expected the pending message first, got %r" % first)
            conn.send(json.dumps({"type": "ack", "seq": receipt["seq"]}))
            conn.send(json.dumps({"type": "ping"}))
            frames = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    text = conn.recv(timeout=max(0.05, deadline - time.monotonic()))
                except TimeoutError:
                    break
                frames.append(text)
                if '"pong"' in text:
                    break
            check(frames and json.loads(frames[-1]).get("type") == "pong",
                  "v1 ws: no pong after ack + ping; frames %r" % frames)
            check(len(frames) == 1,
                  "v1 ws: 'ack' must get no reply, but before the pong the daemon sent %r"
                  % frames[:-1])
        finally:
            conn.close()
        page = expect_json(http.get("/v1/agents/%s/inbox" % me), 200, "v1 inbox after ws ack")
        check(page.get("cursor") == receipt["seq"] and page.get("messages") == [],
              "v1 ws ack did not advance the cursor to %r: %r" % (receipt["seq"], page))
    log("v1 ws: ack advances the cursor without a reply, ping -> pong")


def main():
    t0 = time.monotonic()
    with httpbus.client() as http:
        expect_json(http.get("/healthz"), 200, "GET /healthz")
    run_matrix(SENDERS, RECEIVERS, None)
    chan = unique_name("mx-chan")
    run_matrix([s for s in SENDERS if s != "interop"], [r for r in RECEIVERS if r != "interop"], chan)
    test_ws_control()
    log("matrix done in %.1fs" % (time.monotonic() - t0))


if __name__ == "__main__":
    run(main)
