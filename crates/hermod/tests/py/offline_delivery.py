"""Durable inboxes: nothing is lost while an agent is away or reconnecting.

Proves, with the unmodified hermes-bus 0.7.0 ``BusClient``:

1. An agent that has connected once is *known*: after it disconnects, 100
   messages sent to it are accepted (90 via the ``send`` extension, each
   acknowledged with ``sent`` carrying strictly increasing ``seq``/``ts``; 5
   as plain ``message`` frames; 5 via ``send_message``, which returns True).
2. When the agent reconnects, all 100 arrive within 20 s, in order, with
   the acknowledged ``seq``/``ts``, the sender's ``id`` and ``sent_ts`` kept.
   Frames the daemon wrote but the agent never read before its connection
   dropped are delivered again on the next register (raw-socket check: read
   10 of 50, close, re-register, the other 40 follow in order).
3. With both clients connected, 200 messages sent in bursts separated by
   1-2 s pauses (so the real client's "1 s read timeout = lost connection,
   reconnect after 1 s" churn happens mid-stream: at the timeout edge, while
   b is offline, and across its re-register) all arrive in order.
   Duplicates are tolerated but counted and must stay rare (at most 25%);
   any loss or reordering fails.

Takes about 30 s.
"""
import fcntl
import os
import struct
import sys
import termios
import time
import uuid

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Inbox, RawConn, body_of, check, client_send, dedupe_in_order, describe_sequence_problem,
    is_float, is_int, list_endpoints, log, new_client, run, socket_path, stop_client,
    unique_name, wait_for,
)
from hermes_bus.client import send_message  # noqa: E402

SCRIPT = "offline-delivery"
OFFLINE_COUNT = 100
LIVE_COUNT = 200
MAX_DUP_FRACTION = 0.25


def phase_messages(inbox, run_id, phase):
    return inbox.messages(lambda m: body_of(m).get("run") == run_id
                          and body_of(m).get("phase") == phase)


def wait_all(inbox, run_id, phase, count, timeout):
    def have_all():
        return len({m["body"].get("n") for m in phase_messages(inbox, run_id, phase)}) >= count

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if have_all():
            return
        time.sleep(0.02)
    got = [m["body"].get("n") for m in phase_messages(inbox, run_id, phase)]
    uniq, _ = dedupe_in_order(got)
    check(False, "%s: only %d of %d messages arrived within %.0fs; %s"
          % (phase, len(set(uniq)), count, timeout,
             describe_sequence_problem(uniq, list(range(count)))))


def check_in_order(msgs, count, phase):
    """Dedupe by n (keep first arrival); the result must be exactly 0..count-1."""
    ns, dups = dedupe_in_order([m["body"].get("n") for m in msgs])
    check(ns == list(range(count)),
          "%s: delivery not complete and in order: %s" % (phase, describe_sequence_problem(ns, list(range(count)))))
    firsts = {}
    for m in msgs:
        firsts.setdefault(m["body"]["n"], m)
    ordered = [firsts[n] for n in ns]
    for prev, cur in zip(ordered, ordered[1:]):
        check(is_float(cur.get("ts")) and cur["ts"] > prev["ts"],
              "%s: bus ts not strictly increasing: n=%d ts=%r then n=%d ts=%r"
              % (phase, prev["body"]["n"], prev.get("ts"), cur["body"]["n"], cur.get("ts")))
        check(is_int(cur.get("seq")) and cur["seq"] > prev["seq"],
              "%s: seq not increasing: n=%d seq=%r then n=%d seq=%r"
              % (phase, prev["body"]["n"], prev.get("seq"), cur["body"]["n"], cur.get("seq")))
    for m in msgs:
        f = firsts[m["body"]["n"]]
        check((m.get("id"), m.get("ts"), m.get("seq")) == (f.get("id"), f.get("ts"), f.get("seq")),
              "%s: duplicate of n=%d is not the same stored message: %r vs %r"
              % (phase, m["body"]["n"], m, f))
    return firsts, dups


def unread_bytes(conn):
    """Bytes waiting unread in our receive queue (FIONREAD)."""
    buf = fcntl.ioctl(conn.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def check_unread_redelivered(run_id, from_name):
    c_name = unique_name(SCRIPT + "-unread")
    total, read_first = 50, 10
    body = lambda n: {"n": n, "phase": "unread", "run": run_id}  # noqa: E731
    first = RawConn()
    first.register(c_name, context="unread receiver")
    with RawConn() as s:
        for n in range(total):
            s.send_durable(c_name, body(n), from_name, context="send n=%d to unread receiver" % n)
    mine = lambda m: body_of(m).get("run") == run_id and body_of(m).get("phase") == "unread"  # noqa: E731
    got = []
    for _ in range(read_first):
        m = first.recv_message(mine, 10, "one of the first %d frames at the unread receiver" % read_first)
        got.append(m["body"].get("n"))
    check(got == list(range(read_first)),
          "unread receiver: first frames out of order: %r" % got)
    # make sure the daemon really wrote more before we drop the connection
    deadline = time.monotonic() + 5
    while unread_bytes(first) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    pending = unread_bytes(first)
    first.close()
    if pending == 0:
        log("note: daemon had written nothing beyond the first %d frames before close" % read_first)
    wait_for(lambda: c_name not in list_endpoints("unread receiver closed"), 10,
             "%r to go offline after closing with unread frames" % c_name, interval=0.05)

    with RawConn() as second:
        second.register(c_name, context="unread receiver again")
        deadline = time.monotonic() + 20
        while len(set(got)) < total and time.monotonic() < deadline:
            m = second.recv_or_none(max(0.05, deadline - time.monotonic()))
            if m is None:
                break
            check(m.get("type") == "message", "unread receiver: unexpected frame %r" % m)
            if mine(m):
                got.append(m["body"].get("n"))
    ns, dups = dedupe_in_order(got)
    check(ns == list(range(total)),
          "frames left unread at close (%d bytes were pending) were not redelivered in order: %s"
          % (pending, describe_sequence_problem(ns, list(range(total)))))
    log("unread: %d frames unread at close (%d bytes) all redelivered, %d duplicate deliveries"
        % (total - read_first, pending, dups))


def main():
    sock = socket_path()
    a_name = unique_name(SCRIPT + "-a")
    b_name = unique_name(SCRIPT + "-b")
    run_id = uuid.uuid4().hex

    # ── b becomes known, then goes away ──────────────────────────────────
    b = new_client(b_name)
    check(b.bus_session_id is not None, "b: no bus_session_id after connect")
    wait_for(lambda: b_name in list_endpoints("b online"), 5, "b to be listed", interval=0.05)
    stop_client(b, wait_offline=True)
    log("b registered once and is now offline")

    # ── 100 messages while b is away ─────────────────────────────────────
    acks = {}  # n -> (request, sent reply)
    with RawConn() as s:
        prev = None
        for n in range(90):
            req, rep = s.send_durable(b_name, {"n": n, "phase": "offline", "run": run_id},
                                      a_name, context="send n=%d to offline b" % n)
            if prev is not None:
                check(rep["seq"] > prev["seq"], "sent seq not increasing: %r then %r" % (prev, rep))
                check(rep["ts"] > prev["ts"], "sent ts not strictly increasing: %r then %r" % (prev, rep))
            prev = rep
            acks[n] = (req, rep)

        # plain `message` frames, pipelined; a following pong proves they were
        # processed without an error (b is known, so no endpoint_not_found)
        plain = {}
        for n in range(90, 95):
            req = {"type": "message", "to": b_name, "from": a_name, "id": str(uuid.uuid4()),
                   "ts": time.time(), "body": {"n": n, "phase": "offline", "run": run_id}}
            s.send_obj(req)
            plain[n] = req
        s.ping("after plain messages to offline b (an error frame here means they were rejected)")

    for n in range(95, 100):
        ok = send_message(b_name, {"n": n, "phase": "offline", "run": run_id},
                          socket_path=sock, from_ep=a_name)
        check(ok is True, "send_message n=%d to known-but-offline b returned %r" % (n, ok))

    check(b_name not in list_endpoints("b still offline"),
          "b is listed as connected while it should be offline; the test would not prove offline delivery")
    log("100 messages accepted for offline b")

    # ── b comes back: all 100 in order ───────────────────────────────────
    b = new_client(b_name)
    b_inbox = Inbox(b)
    wait_all(b_inbox, run_id, "offline", OFFLINE_COUNT, 20)
    msgs = phase_messages(b_inbox, run_id, "offline")
    firsts, dups = check_in_order(msgs, OFFLINE_COUNT, "offline")
    for n, m in firsts.items():
        check(m.get("from") == a_name, "offline n=%d: from=%r, expected %r" % (n, m.get("from"), a_name))
        check(m.get("to") == b_name, "offline n=%d: to=%r, expected %r" % (n, m.get("to"), b_name))
        check(m.get("channel") == "default", "offline n=%d: channel=%r" % (n, m.get("channel")))
        check(m.get("body") == {"n": n, "phase": "offline", "run": run_id},
              "offline n=%d: body changed: %r" % (n, m.get("body")))
        if n in acks:
            req, rep = acks[n]
            check(m.get("id") == req["id"], "offline n=%d: id %r != sent id %r" % (n, m.get("id"), req["id"]))
            check(m.get("sent_ts") == req["ts"],
                  "offline n=%d: sent_ts %r != client ts %r" % (n, m.get("sent_ts"), req["ts"]))
            check(m.get("seq") == rep["seq"],
                  "offline n=%d: delivered seq %r != seq %r in the 'sent' ack" % (n, m.get("seq"), rep["seq"]))
            check(m.get("ts") == rep["ts"],
                  "offline n=%d: delivered ts %r != ts %r in the 'sent' ack" % (n, m.get("ts"), rep["ts"]))
        elif n in plain:
            req = plain[n]
            check(m.get("id") == req["id"], "offline n=%d: id %r != sent id %r" % (n, m.get("id"), req["id"]))
            check(m.get("sent_ts") == req["ts"],
                  "offline n=%d: sent_ts %r != client ts %r" % (n, m.get("sent_ts"), req["ts"]))
    log("offline: %d/%d delivered in order after reconnect, %d duplicate deliveries"
        % (len(firsts), OFFLINE_COUNT, dups))

    # ── frames left unread when a connection drops are not lost ──────────
    # This is what the real client does on every idle cycle (its 1 s read
    # timeout closes the socket whatever the daemon has written meanwhile),
    # made deterministic with a raw receiver that reads 10 of 50 frames and
    # closes with the rest unread.
    check_unread_redelivered(run_id, a_name)

    # ── live stream across reconnect churn ───────────────────────────────
    a = new_client(a_name)
    a_inbox = Inbox(a)
    # Bursts of 25 messages 10 ms apart, separated by pauses chosen against
    # the real client's cycle (read times out 1 s after the last frame, then
    # it is offline for 1 s and re-registers): ~1.0 s lands on the timeout
    # edge, 1.2/1.5 s while b is offline, 1.85-2.0 s across its re-register
    # (inbox drain racing live traffic).  a's own churn adds jitter.
    pauses = [1.0, 1.9, 1.2, 2.0, 1.5, 0.99, 1.85]
    start = time.monotonic()
    for n in range(LIVE_COUNT):
        if n and n % 25 == 0:
            time.sleep(pauses[(n // 25 - 1) % len(pauses)])
        else:
            time.sleep(0.01)
        client_send(a, b_name, {"n": n, "phase": "live", "run": run_id})
        b_inbox.pump()
    log("live: sent %d messages in %.1fs" % (LIVE_COUNT, time.monotonic() - start))

    wait_all(b_inbox, run_id, "live", LIVE_COUNT, 20)
    msgs = phase_messages(b_inbox, run_id, "live")
    firsts, dups = check_in_order(msgs, LIVE_COUNT, "live")
    for n, m in firsts.items():
        check(m.get("from") == a_name, "live n=%d: from=%r, expected %r" % (n, m.get("from"), a_name))
        check(m.get("to") == b_name, "live n=%d: to=%r" % (n, m.get("to")))
    log("live: %d/%d delivered in order, %d duplicate deliveries" % (len(firsts), LIVE_COUNT, dups))
    check(dups <= MAX_DUP_FRACTION * LIVE_COUNT,
          "live: %d duplicate deliveries for %d messages; duplicates must be rare" % (dups, LIVE_COUNT))

    # ts strictly increasing across both phases (b's inbox is one ordered log)
    last_offline = max(m["ts"] for m in phase_messages(b_inbox, run_id, "offline"))
    first_live = firsts[0]["ts"]
    check(first_live > last_offline, "bus ts went backwards between phases: %r then %r"
          % (last_offline, first_live))

    # no errors or other non-message frames (stray broadcasts from other
    # tests sharing the daemon are ignored)
    check(not a_inbox.non_messages(), "a received unexpected frames: %r" % a_inbox.non_messages()[:3])
    check(not b_inbox.non_messages(), "b received unexpected frames: %r" % b_inbox.non_messages()[:3])

    stop_client(a)
    stop_client(b)


if __name__ == "__main__":
    run(main)
