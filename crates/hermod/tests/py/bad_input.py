"""Malformed and hostile input is rejected precisely and never hurts the daemon.

Proves, over raw sockets:

(a) a length prefix over 10 MiB (0xFFFFFFFF, and 10 MiB + 1) gets a
    ``frame_too_large`` error and then the connection is closed without the
    body being read; a frame of exactly 10 MiB is not rejected as too large;
(b) a truncated frame followed by close does not disturb the daemon;
(c) invalid UTF-8 gets ``invalid_json`` and the connection stays usable;
(d) valid JSON that is not an object (``[1,2]``, ``"str"``, ``3``, ``null``),
    broken JSON and an empty payload get ``invalid_json``; connection stays open;
(e) an unknown ``type`` gets ``unknown_type``; connection stays open;
(f) bad names (``"bad name!"``, ``""``, 129 chars, non-ASCII, bad channel,
    bad ``to``/``from``) get ``invalid_name``; connection stays open and a
    128-char name is accepted;
(g) a message whose body is not an object gets ``invalid_request`` and is
    not delivered;
(h) 1,000 connections opened and dropped (some mid-frame) leave the daemon
    answering ping and routing ``send``;
and finally two real ``BusClient``s still exchange a message.
"""
import os
import struct
import sys
import time
import uuid

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    MAX_FRAME, Inbox, RawConn, body_of, check, client_send, daemon_alive, encode_obj, fail, frame,
    log, new_client, run, socket_path, stop_client, unique_name,
)

SCRIPT = "bad-input"


def still_open(conn, context):
    """The same connection still answers ping with pong."""
    conn.ping("connection must stay open after " + context)


def case_frame_too_large():
    for length in (0xFFFFFFFF, MAX_FRAME + 1):
        with RawConn() as c:
            c.send_bytes(struct.pack(">I", length))
            c.expect_error("frame_too_large", "length prefix %d" % length)
            check(c.wait_closed(5), "length prefix %d: connection not closed within 5s after "
                  "frame_too_large" % length)
    # exactly 10 MiB is allowed: a padded ping must not be rejected as too large
    with RawConn(timeout=20) as c:
        head = b'{"type":"ping","pad":"'
        tail = b'"}'
        payload = head + b"x" * (MAX_FRAME - len(head) - len(tail)) + tail
        assert len(payload) == MAX_FRAME
        c.send_payload(payload)
        reply = c.recv(20, "reply to a frame of exactly 10 MiB")
        check(not (reply.get("type") == "error" and reply.get("code") == "frame_too_large"),
              "a frame of exactly 10 MiB (the maximum) was rejected: %r" % reply)
        log("note: exactly-10-MiB ping answered with %r" % reply.get("type"))
    daemon_alive("after frame_too_large")
    log("(a) frame_too_large ok")


def case_truncated():
    with RawConn() as c:
        c.send_bytes(struct.pack(">I", 100) + b'{"type":"p')
    # also a header cut in the middle
    with RawConn() as c:
        c.send_bytes(b"\x00\x00")
    daemon_alive("after truncated frames")
    log("(b) truncated frames ok")


def case_invalid_json():
    with RawConn() as c:
        c.send_payload(b'{"type":"ping","x":"\xff\xfe\xc3"}')
        c.expect_error("invalid_json", "invalid UTF-8 payload")
        still_open(c, "invalid UTF-8")
        cases = [
            (b"[1,2]", "JSON array"),
            (b'"str"', "JSON string"),
            (b"3", "JSON number"),
            (b"null", "JSON null"),
            (b'{"type":"ping"', "truncated JSON object"),
            (b"not json at all", "garbage text"),
            (b"", "empty payload"),
        ]
        for payload, what in cases:
            c.send_payload(payload)
            c.expect_error("invalid_json", what)
            still_open(c, what)
    log("(c,d) invalid_json ok, connection stays open")


def case_unknown_type():
    with RawConn() as c:
        c.send_obj({"type": "bogus"})
        c.expect_error("unknown_type", '{"type":"bogus"}')
        still_open(c, "unknown_type")
        # a missing/non-string type is not a known type either; either code is defensible
        for obj in ({"no_type": 1}, {"type": 7}):
            c.send_obj(obj)
            reply = c.recv(what="error for %r" % obj)
            check(reply.get("type") == "error" and reply.get("code") in ("unknown_type", "invalid_request"),
                  "%r: expected error unknown_type or invalid_request, got %r" % (obj, reply))
            still_open(c, repr(obj))
    log("(e) unknown_type ok")


def case_invalid_name(known):
    bad_names = ["bad name!", "", "x" * 129, "a/b", "caf\u00e9", "tab\there", "new\nline"]
    with RawConn() as c:
        for name in bad_names:
            c.send_obj({"type": "register", "endpoint": name})
            c.expect_error("invalid_name", "register endpoint %r" % name[:40])
            still_open(c, "invalid_name for %r" % name[:40])
        c.send_obj({"type": "register", "endpoint": unique_name(SCRIPT + "-ch"), "channel": "bad chan!"})
        c.expect_error("invalid_name", "register with channel 'bad chan!'")
        still_open(c, "invalid channel")
        c.send_obj({"type": "register", "endpoint": unique_name(SCRIPT + "-ch"), "channel": "c" * 129})
        c.expect_error("invalid_name", "register with a 129-char channel")
        still_open(c, "129-char channel")
        # addressing with bad names
        for field, value in (("to", "bad name!"), ("to", "y" * 129), ("from", "bad name!"), ("from", "z" * 129)):
            msg = {"type": "send", "to": known, "from": known, "id": str(uuid.uuid4()),
                   "ts": time.time(), "body": {"bad": field}}
            msg[field] = value
            c.send_obj(msg)
            c.expect_error("invalid_name", "send with %s=%r" % (field, value[:40]))
            still_open(c, "invalid %s" % field)
        msg = {"type": "message", "to": "bad name!", "from": known, "id": str(uuid.uuid4()),
               "ts": time.time(), "body": {}}
        c.send_obj(msg)
        c.expect_error("invalid_name", "message with to='bad name!'")
        still_open(c, "invalid to on message")
        # the 128-char boundary is valid, and the rejected attempts did not register anything
        name128 = (unique_name(SCRIPT) + "-" + "z" * 128)[:128]
        assert len(name128) == 128
        c.register(name128, context="register a 128-char name")
        still_open(c, "registering a 128-char name")
    log("(f) invalid_name ok")


def case_invalid_request(receiver, receiver_name):
    sender = unique_name(SCRIPT + "-sender")
    with RawConn() as c:
        for typ in ("message", "send"):
            for body in ("text", [1, 2], 5, None):
                mid = str(uuid.uuid4())
                c.send_obj({"type": typ, "to": receiver_name, "from": sender,
                            "id": mid, "ts": time.time(), "body": body})
                c.expect_error("invalid_request", "%s with body %r" % (typ, body))
                still_open(c, "invalid_request (%s, body %r)" % (typ, body))
        c.send_obj({"type": "register"})
        c.expect_error("invalid_request", "register without endpoint")
        still_open(c, "register without endpoint")
    # none of the rejected messages reached the (connected) receiver
    leaked = [f for f in receiver.collect(0.5)
              if f.get("type") != "message" or f.get("from") == sender]
    check(not leaked, "rejected messages (or other frames) reached the receiver: %r" % leaked[:3])
    log("(g) invalid_request ok, nothing delivered")


def case_connection_storm(receiver, receiver_name):
    path = socket_path()
    half_ping = frame(encode_obj({"type": "ping"}))
    for batch in range(10):
        conns = []
        for i in range(100):
            c = RawConn(path)
            conns.append(c)
            kind = i % 4
            try:
                if kind == 1:
                    # half a frame: header promising 64 bytes, 20 sent
                    c.send_bytes(struct.pack(">I", 64) + b'{"type":"ping","pad"')
                elif kind == 2:
                    # half a header
                    c.send_bytes(half_ping[:2])
                elif kind == 3:
                    # a full request whose reply is never read
                    c.send_bytes(half_ping)
            except OSError as e:
                fail("connection storm batch %d conn %d: send failed: %s" % (batch, i, e))
        for c in conns:
            c.close()
    with RawConn() as c:
        still_open(c, "1,000 connections (fresh connection)")
        req, rep = c.send_durable(receiver_name, {"after": "storm"}, unique_name(SCRIPT + "-s"),
                                  context="send after connection storm")
    got = receiver.recv_message(lambda m: m.get("id") == req["id"], 10,
                                "message %s sent after the connection storm" % req["id"])
    check(got.get("body") == {"after": "storm"}, "message after the storm: body changed: %r" % got)
    check(got.get("seq") == rep["seq"], "delivered seq %r != acked seq %r" % (got.get("seq"), rep["seq"]))
    log("(h) 1,000 connections ok; ping and send still work")


def main():
    socket_path()
    receiver_name = unique_name(SCRIPT + "-recv")
    receiver = RawConn()
    receiver.register(receiver_name, context="raw receiver")
    try:
        case_frame_too_large()
        case_truncated()
        case_invalid_json()
        case_unknown_type()
        case_invalid_name(receiver_name)
        case_invalid_request(receiver, receiver_name)
        case_connection_storm(receiver, receiver_name)
        receiver.ping("receiver connection survived everything")
    finally:
        receiver.close()

    # A real client pair still works afterwards.
    a = new_client(unique_name(SCRIPT + "-a"))
    b = new_client(unique_name(SCRIPT + "-b"))
    token = uuid.uuid4().hex
    client_send(a, b.endpoint, {"token": token, "text": "still alive ✓"})
    msg = Inbox(b).wait_message(lambda m: body_of(m).get("token") == token, 20,
                                "BusClient b to receive a's message after the bad input")
    check(msg.get("from") == a.endpoint, "final message: from=%r, expected %r" % (msg.get("from"), a.endpoint))
    check(msg.get("body") == {"token": token, "text": "still alive ✓"}, "final message body changed: %r" % msg)
    stop_client(a)
    stop_client(b)
    log("BusClient pair still exchanges messages")


if __name__ == "__main__":
    run(main)
