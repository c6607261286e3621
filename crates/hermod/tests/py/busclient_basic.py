"""The real hermes-bus 0.7.0 client works against hermod.

Proves, using the unmodified PyPI ``BusClient`` / ``send_message``:

* both clients register and get a UUID ``bus_session_id``;
* ``BusClient.send`` delivers a body with unicode/emoji, escapes, nesting,
  ints (incl. beyond 64 bits), floats, a list, null and ``text`` unchanged
  (parsed-equal, equal under ``json.dumps(sort_keys=True)``, same key order),
  with ``from``/``to``/uuid ``id``/bus ``ts``/client ``sent_ts``/``channel``/
  ``seq`` as documented;
* the body is byte-for-byte what the sender wrote (raw-socket check with
  odd spacing, escapes and number spellings);
* ``send_message`` (short-lived, unregistered) returns True and arrives with
  ``from == "anonymous"``;
* a ``message`` to a never-known name gets ``endpoint_not_found`` carrying the
  message id, ``send_message`` returns False, and nothing is stored;
* ``list_endpoints`` lists connected endpoints (and drops a closed one);
  ``ping`` gets ``pong``;
* 20 back-to-back messages arrive in order, bus ``ts`` and ``seq`` strictly
  increase, and nothing is lost although the real client drops and
  re-registers its connection every ~2 s when idle.
"""
import json
import os
import sys
import time
import uuid

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Inbox, RawConn, body_of, check, client_send, dedupe_in_order, describe_sequence_problem,
    fail, is_float, is_int, is_uuid, list_endpoints, log, new_client, run, socket_path,
    stop_client, unique_name, wait_for,
)
from hermes_bus.client import send_message  # noqa: E402

SCRIPT = "busclient-basic"

RICH_BODY = {
    "text": "héllo wörld 👋🏽 — 中文 ✓ \"quoted\" back\\slash\nnew line\ttab \u0001 \u2028",
    "emoji": "😀🎉👩‍👩‍👧",
    "nested": {"a": {"b": [1, 2, {"c": None, "d": [True, False]}]}, "empty_obj": {}, "empty_list": []},
    "int": 42,
    "negative": -7,
    "zero": 0,
    "i64_min": -(2 ** 63),
    "u64_max": 2 ** 64 - 1,
    "beyond_f64_precision": 2 ** 53 + 1,
    "huge_int": 2 ** 70,
    "float": 3.141592653589793,
    "small_float": 1e-07,
    "big_float": 1.5e300,
    "one_point_oh": 1.0,
    "list": [1, "two", 3.5, None, {"k": "v"}, ["x"]],
    "null": None,
    "zzz_key_order": "last",
    "aaa_key_order": "after zzz",
}

# Raw body text with unusual but valid spelling. If hermod keeps bodies
# byte-for-byte, this exact byte string appears in the delivered frame.
RAW_BODY_TEXT = (
    '{ "zeta" : 1,"alpha":[1.0, 2.50E0 ,-0.0,{"k":"\\u00e9\\ud83d\\ude00"}],'
    '"big":123456789012345678901234567890,  "s":"tab\\there\\/slash", "n":null }'
)


def check_rich_body(got, sent, context):
    check(isinstance(got, dict), "%s: body is not an object: %r" % (context, got))
    if got != sent:
        diffs = sorted(k for k in set(sent) | set(got)
                       if sent.get(k, "<missing>") != got.get(k, "<missing>"))
        fail("%s: body differs after the round trip; differing keys %s; got %r"
             % (context, diffs, {k: got.get(k, "<missing>") for k in diffs}))
    check(json.dumps(got, sort_keys=True) == json.dumps(sent, sort_keys=True),
          "%s: json.dumps(sort_keys=True) of the body differs" % context)
    check(list(got.keys()) == list(sent.keys()),
          "%s: body key order changed (body must be byte-for-byte the same): got %r, sent %r"
          % (context, list(got.keys()), list(sent.keys())))
    check(json.dumps(got, ensure_ascii=False) == json.dumps(sent, ensure_ascii=False),
          "%s: body does not re-serialize identically" % context)


def check_delivered(msg, sender, recipient, t_before, t_after, context):
    """Common header checks on a delivered frame from a BusClient/send_message."""
    check(msg.get("type") == "message", "%s: not a message frame: %r" % (context, msg))
    check(msg.get("from") == sender, "%s: from=%r, expected %r" % (context, msg.get("from"), sender))
    check(msg.get("to") == recipient, "%s: to=%r, expected %r" % (context, msg.get("to"), recipient))
    check(is_uuid(msg.get("id")), "%s: id is not a uuid string: %r" % (context, msg.get("id")))
    ts = msg.get("ts")
    check(is_float(ts), "%s: ts is not a float: %r" % (context, ts))
    now = time.time()
    check(t_before - 5 <= ts <= now + 5,
          "%s: bus ts %r is not within a few seconds of now (%r)" % (context, ts, now))
    sent_ts = msg.get("sent_ts")
    check(is_float(sent_ts), "%s: sent_ts (client ts) missing or not a float: %r" % (context, sent_ts))
    check(t_before - 0.001 <= sent_ts <= t_after + 0.001,
          "%s: sent_ts %r is not the client's ts (sent between %r and %r)"
          % (context, sent_ts, t_before, t_after))
    check(msg.get("channel") == "default", "%s: channel=%r, expected 'default'" % (context, msg.get("channel")))
    check(is_int(msg.get("seq")), "%s: seq is not an integer: %r" % (context, msg.get("seq")))
    check(isinstance(msg.get("body"), dict), "%s: body is not an object: %r" % (context, msg.get("body")))


def main():
    sock = socket_path()
    a_name = unique_name(SCRIPT + "-a")
    b_name = unique_name(SCRIPT + "-b")
    run_id = uuid.uuid4().hex

    # ── connect ──────────────────────────────────────────────────────────
    a = new_client(a_name)
    b = new_client(b_name)
    for c in (a, b):
        check(c.bus_session_id is not None, "%s: bus_session_id not set after connect" % c.endpoint)
        check(is_uuid(c.bus_session_id), "%s: bus_session_id is not a UUID: %r"
              % (c.endpoint, c.bus_session_id))
    check(a.bus_session_id != b.bus_session_id, "a and b got the same session_id")
    log("connected %s (%s) and %s (%s)" % (a_name, a.bus_session_id, b_name, b.bus_session_id))
    a_inbox, b_inbox = Inbox(a), Inbox(b)

    # ── rich body via BusClient.send ─────────────────────────────────────
    body = dict(RICH_BODY, run=run_id, step="rich")
    t0 = time.time()
    client_send(a, b_name, body)
    t1 = time.time()
    msg = b_inbox.wait_message(lambda m: body_of(m).get("step") == "rich", 20,
                               "b to receive the rich-body message")
    check_delivered(msg, a_name, b_name, t0, t1, "rich message")
    check_rich_body(msg["body"], body, "rich message")
    log("rich body round-tripped; delivered frame keys: %s" % sorted(msg))

    # ── byte-for-byte body (raw sockets) ─────────────────────────────────
    r_name = unique_name(SCRIPT + "-raw")
    with RawConn() as recv_conn, RawConn() as send_conn:
        reg = recv_conn.register(r_name, context="raw receiver register")
        msg_id = str(uuid.uuid4())
        payload = ('{"type":"message","to":%s,"from":%s,"id":%s,"ts":%r,"body":%s}'
                   % (json.dumps(r_name), json.dumps(a_name), json.dumps(msg_id), time.time(),
                      RAW_BODY_TEXT)).encode("utf-8")
        send_conn.send_payload(payload)
        while True:  # skip broadcasts from other tests sharing the daemon
            raw = recv_conn.recv_raw(10, "raw-body message")
            delivered = json.loads(raw.decode("utf-8"))
            if not (delivered.get("type") == "message" and delivered.get("id") != msg_id):
                break
        check(delivered.get("type") == "message" and delivered.get("id") == msg_id,
              "raw receiver: expected our message with id %s, got %r" % (msg_id, delivered))
        check(delivered.get("body") == json.loads(RAW_BODY_TEXT),
              "raw-body message: parsed body differs: %r" % delivered.get("body"))
        check(RAW_BODY_TEXT.encode("utf-8") in raw,
              "raw-body message: body is not byte-for-byte what was sent.\n  sent body: %s\n  frame:     %s"
              % (RAW_BODY_TEXT, raw.decode("utf-8")))
        send_conn.ping("raw sender still open after message")

        # list_endpoints shows a stable raw-registered endpoint with its session
        eps = list_endpoints("with raw receiver")
        check(eps.get(r_name) == reg["session_id"],
              "list_endpoints: %r should map to its session %r, got %r"
              % (r_name, reg["session_id"], eps.get(r_name)))
        check(all(isinstance(k, str) and isinstance(v, str) for k, v in eps.items()),
              "list_endpoints: names and session ids must be strings: %r" % eps)
    # after the receiver's connection closes it is no longer listed
    wait_for(lambda: r_name not in list_endpoints("after raw close"), 5,
             "closed endpoint %r to disappear from list_endpoints" % r_name, interval=0.05)
    log("byte-for-byte body ok; list_endpoints tracks a raw endpoint")

    # ── send_message (short-lived, anonymous) ────────────────────────────
    anon_body = {"run": run_id, "step": "anon", "text": "from send_message ✉"}
    t0 = time.time()
    ok = send_message(b_name, anon_body, socket_path=sock)
    t1 = time.time()
    check(ok is True, "send_message to known endpoint %r returned %r, expected True" % (b_name, ok))
    msg = b_inbox.wait_message(lambda m: body_of(m).get("step") == "anon", 20,
                               "b to receive the send_message message")
    check_delivered(msg, "anonymous", b_name, t0, t1, "send_message")
    check(msg["body"] == anon_body, "send_message: body differs: %r" % msg["body"])
    log("send_message delivered with from=anonymous")

    # ── unknown endpoint ─────────────────────────────────────────────────
    ghost = unique_name(SCRIPT + "-never-seen")
    ok = send_message(ghost, {"run": run_id, "step": "ghost"}, socket_path=sock)
    check(ok is False, "send_message to never-seen %r returned %r, expected False" % (ghost, ok))
    with RawConn() as c:
        for attempt in (1, 2):
            mid = str(uuid.uuid4())
            c.send_obj({"type": "message", "to": ghost, "from": a_name, "id": mid,
                        "ts": time.time(), "body": {"run": run_id, "step": "ghost"}})
            err = c.expect_error("endpoint_not_found", "message to never-seen name (attempt %d)" % attempt)
            check(err.get("id") == mid, "endpoint_not_found must carry the message id %r: %r" % (mid, err))
        c.ping("connection open after endpoint_not_found")
    # nothing was stored: registering the ghost name now yields no messages
    with RawConn() as g:
        g.register(ghost, context="register former ghost")
        stored = [f for f in g.collect(1.0)
                  if f.get("type") != "message" or body_of(f).get("run") == run_id]
        check(not stored, "messages rejected with endpoint_not_found were stored and delivered "
              "once %r registered: %r" % (ghost, stored[:3]))
    log("unknown endpoint rejected with endpoint_not_found; nothing stored")

    # ── list_endpoints with churning BusClients, ping ────────────────────
    # The real clients are offline ~1 s out of every ~2 s, possibly in
    # anti-phase, so require each to be listed at some point within 5 s and
    # only note it if they were never listed at the same instant.
    seen = set()
    together = False
    deadline = time.monotonic() + 5
    while not together and time.monotonic() < deadline:
        eps = list_endpoints("with BusClients")
        present = {a_name, b_name} & set(eps)
        for n in present:
            check(is_uuid(eps[n]), "list_endpoints: session id of %r is not a UUID: %r" % (n, eps[n]))
        seen |= present
        together = len(present) == 2
        time.sleep(0.05)
    check(seen == {a_name, b_name}, "list_endpoints never listed %s within 5s (saw %s)"
          % (sorted({a_name, b_name} - seen), sorted(seen)))
    if not together:
        log("note: a and b were each listed, but never at the same instant (client churn)")
    with RawConn() as c:
        c.ping("plain ping")
    log("list_endpoints and ping ok")

    # ── 20 messages in order, ts strictly increasing ─────────────────────
    for k in range(20):
        client_send(a, b_name, {"run": run_id, "step": "seq", "k": k})

    def seq_msgs():
        return b_inbox.messages(lambda m: body_of(m).get("step") == "seq")

    wait_for(lambda: len({m["body"]["k"] for m in seq_msgs()}) >= 20, 20,
             "all 20 sequence messages at b")
    msgs = seq_msgs()
    ks, dups = dedupe_in_order([m["body"]["k"] for m in msgs])
    check(ks == list(range(20)), "20 messages a->b: %s" % describe_sequence_problem(ks, list(range(20))))
    log("20 messages in order (%d duplicate deliveries)" % dups)

    # Over everything b received (deduplicated by id): bus ts and seq strictly increase.
    all_msgs = b_inbox.messages(lambda m: body_of(m).get("run") == run_id)
    firsts = {}
    for m in all_msgs:
        firsts.setdefault(m.get("id"), m)
    ordered_ids, _ = dedupe_in_order([m.get("id") for m in all_msgs])
    ordered = [firsts[i] for i in ordered_ids]
    check(len(ordered) == 22, "b should hold 22 distinct messages (rich, anon, 20), has %d" % len(ordered))
    for prev, cur in zip(ordered, ordered[1:]):
        check(is_float(cur.get("ts")) and cur["ts"] > prev["ts"],
              "bus ts not strictly increasing: %r (%s) then %r (%s)"
              % (prev.get("ts"), prev["body"].get("step"), cur.get("ts"), cur["body"].get("step")))
        check(cur.get("seq") > prev.get("seq"),
              "seq not increasing within b's inbox: %r then %r" % (prev.get("seq"), cur.get("seq")))
        check(cur.get("from") == a_name or cur["body"].get("step") == "anon", "unexpected sender: %r" % cur)
    # A duplicate must be the same message (same ts/seq/body), not a re-stamped copy.
    for m in all_msgs:
        f = firsts[m.get("id")]
        check((m.get("ts"), m.get("seq"), m.get("body")) == (f.get("ts"), f.get("seq"), f.get("body")),
              "duplicate delivery of id %s differs from the first: %r vs %r" % (m.get("id"), m, f))
    total_dups = len(all_msgs) - len(ordered)
    log("ts/seq strictly increasing over %d messages (%d duplicate deliveries in total)"
        % (len(ordered), total_dups))

    # No error or other non-message frame was pushed to either client.  (Stray
    # messages are not checked: on a shared daemon another test may broadcast.)
    check(not a_inbox.non_messages(), "a received unexpected frames: %r" % a_inbox.non_messages()[:3])
    check(not b_inbox.non_messages(), "b received unexpected frames: %r" % b_inbox.non_messages()[:3])
    ours_at_a = a_inbox.messages(lambda m: body_of(m).get("run") == run_id)
    check(not ours_at_a, "a received its own messages: %r" % ours_at_a[:3])

    stop_client(a)
    stop_client(b)


if __name__ == "__main__":
    run(main)
