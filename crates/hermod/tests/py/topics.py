"""Topic events (hermes_events) through the daemon: HTTP v1, the Unix socket
and the v1 WebSocket.

Proves:

(a) Pattern rules, through ``GET /v1/events?pattern=...&channel=CH`` (SSE,
    from now): ``tui.*`` (exactly one more segment), ``tui.**`` (``tui``
    itself and anything below), ``a.**.z`` (``**`` is zero or more segments
    in the middle), ``*.tool.*`` and ``**`` each get EXACTLY the matching
    events of a mixed fast/durable run, in order, with SSE ``id`` == seq;
    events on another channel reach none of them.  ``POST /v1/events``
    receipts: ``{"id","seq","ts"}`` with seq/ts null for the fast class and
    set (matching the delivered message) for ``durable: true``; a given
    ``id`` is kept.
(b) Envelope stamping: ``type`` (topic), ``ts`` (bus now, float) and ``src``
    (first segment) are filled only where the publisher left them out
    (given values -- even ``null`` -- are kept; other payload keys are kept
    as is; no payload at all works).
(c) ``Last-Event-ID`` resumes exactly: the events published while
    disconnected are delivered, nothing read before is repeated, and the
    stream goes on live; ``after=SEQ`` starts after SEQ; ``Last-Event-ID``
    wins over ``after``.
(d) Invalid topics -> 400 ``invalid_topic`` (publish, SSE pattern,
    subscription add/remove).
(e) Durable agent subscriptions (``/v1/agents/{name}/subscriptions``):
    add (idempotent), list, DELETE; after adding ``tui.**`` the agent's
    inbox gets exactly the matching events (fast and durable, same channel
    only) in order, ``/recv`` sees them too; after DELETE new events no
    longer land.
(f) Unix socket: ``subscribe`` -> ``subscribed`` then live ``message``
    frames (with ``topic``) of matching events published via HTTP, via a
    ``publish`` frame on another connection and on the same connection;
    nothing else (non-matching, other channel); ``published`` replies with
    and without seq; bad patterns -> ``invalid_topic`` and the connection
    goes on; on a connection registered on channel CH it follows CH only.
    A durable subscription on a registered connection: the
    matching events land in the agent's inbox and are delivered on that same
    connection; events published while it is offline are delivered on the
    next registration.
(g) v1 WebSocket ``/v1/agents/{n}/ws``: live ``subscribe`` + ``publish``
    (replies, exact delivery); a durable ``subscribe`` delivers through the
    agent's inbox on its WebSocket.
"""
import json
import os
import sys
import time

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RawConn, check, fail, is_float, is_int, log, run, unique_name  # noqa: E402
from httpbus import (SSEReader, WSReader, client, expect_error, expect_json,  # noqa: E402
                     norm_frame, stop_all)

SETTLE = 1.0
WAIT = 10.0


# ── helpers ───────────────────────────────────────────────────────────────

def pub_http(http, topic, payload=None, durable=False, channel=None, frm=None, msg_id=None,
             omit_payload=False):
    req = {"topic": topic}
    if not omit_payload:
        req["payload"] = {} if payload is None else payload
    if durable:
        req["durable"] = True
    if channel is not None:
        req["channel"] = channel
    if frm is not None:
        req["from"] = frm
    if msg_id is not None:
        req["id"] = msg_id
    what = "POST /v1/events %s%s" % (topic, " (durable)" if durable else "")
    r = expect_json(http.post("/v1/events", json=req), 200, what)
    check(isinstance(r, dict) and set(r) == {"id", "seq", "ts"},
          "%s: receipt %r is not {id, seq, ts}" % (what, r))
    check(isinstance(r["id"], str) and r["id"], "%s: receipt id %r" % (what, r["id"]))
    if msg_id is not None:
        check(r["id"] == msg_id, "%s: receipt id %r, expected the given %r" % (what, r["id"], msg_id))
    if durable:
        check(is_int(r["seq"]) and r["seq"] > 0 and is_float(r["ts"]),
              "%s: durable receipt needs an integer seq and a float ts: %r" % (what, r))
    else:
        check(r["seq"] is None and r["ts"] is None,
              "%s: fast receipt must have seq and ts null: %r" % (what, r))
    return r


def pub_unix(conn, topic, payload=None, durable=False, channel=None, frm=None, msg_id=None):
    req = {"type": "publish", "topic": topic, "payload": {} if payload is None else payload}
    if durable:
        req["durable"] = True
    if channel is not None:
        req["channel"] = channel
    if frm is not None:
        req["from"] = frm
    if msg_id is not None:
        req["id"] = msg_id
    what = "unix publish %s%s" % (topic, " (durable)" if durable else "")
    r = conn.request(req, what=what)
    check(r.get("type") == "published", "%s: expected a 'published' reply, got %r" % (what, r))
    check(isinstance(r.get("id"), str) and r["id"], "%s: reply id %r" % (what, r))
    if msg_id is not None:
        check(r["id"] == msg_id, "%s: reply id %r, expected the given %r" % (what, r["id"], msg_id))
    if durable:
        check(set(r) == {"type", "id", "seq", "ts"} and is_int(r["seq"]) and is_float(r["ts"]),
              "%s: durable reply must be {type, id, seq: int, ts: float}: %r" % (what, r))
    else:
        check(set(r) == {"type", "id"},
              "%s: fast reply must be exactly {type: published, id}: %r" % (what, r))
    return r


def topic_of(rec):
    return rec["raw"].get("topic")


def check_near_now(ts, what):
    check(is_float(ts), "%s: ts %r is not a float" % (what, ts))
    check(abs(ts - time.time()) < 60, "%s: ts %r is not the bus's current time (now %r)"
          % (what, ts, time.time()))


def check_stamped(body, topic, extra, what):
    """``body`` is ``extra`` + the three stamps for ``topic``."""
    check(isinstance(body, dict), "%s: body is not an object: %r" % (what, body))
    want_keys = set(extra) | {"type", "ts", "src"}
    check(set(body) == want_keys, "%s: body keys %r, expected %r" % (what, sorted(body), sorted(want_keys)))
    for k, v in extra.items():
        check(body[k] == v, "%s: payload key %r is %r, expected %r" % (what, k, body[k], v))
    check(body["type"] == topic, "%s: type %r, expected the topic %r" % (what, body["type"], topic))
    check(body["src"] == topic.split(".")[0],
          "%s: src %r, expected the first segment %r" % (what, body["src"], topic.split(".")[0]))
    check_near_now(body["ts"], what + " (stamped ts)")


def sse_events(pattern, channel=None, label=None, after=None, last_event_id=None):
    params = {"pattern": pattern}
    if channel is not None:
        params["channel"] = channel
    if after is not None:
        params["after"] = str(after)
    headers = {}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    r = SSEReader("/v1/events", label or "SSE /v1/events?pattern=%s" % pattern,
                  params=params, headers=headers, normalise=norm_frame).start()
    r.wait_ready()
    return r


def check_sse_record(rec, what):
    check(rec["raw"].get("type") == "message", "%s: data is not a message frame: %r" % (what, rec["raw"]))
    check(is_int(rec["seq"]) and rec.get("event_id") == str(rec["seq"]),
          "%s: SSE id %r is not the seq %r" % (what, rec.get("event_id"), rec["seq"]))
    check(isinstance(topic_of(rec), str), "%s: no topic in %r" % (what, rec["raw"]))


def exactly(reader, want_ids, what, settle=SETTLE, key=lambda r: r["id"]):
    """Wait for ``len(want_ids)`` records, settle, then the records (by
    ``key``) must be exactly ``want_ids`` in order."""
    if want_ids:
        reader.wait_for(lambda r: True, len(want_ids), WAIT, what)
    time.sleep(settle)
    reader.check_alive()
    recs = reader.snapshot()
    got = [key(r) for r in recs]
    if got != want_ids:
        fail("%s: got %r, expected exactly %r (topics got: %r)"
             % (what, got, want_ids, [topic_of(r) for r in recs]))
    return recs


# ── (a) patterns ──────────────────────────────────────────────────────────

PATTERNS = ["tui.*", "tui.**", "a.**.z", "*.tool.*", "**"]

# topic -> the patterns above that match it
TOPICS = [
    ("tui", {"tui.**", "**"}),
    ("tui.tool", {"tui.*", "tui.**", "**"}),
    ("tui.tool.start", {"tui.**", "*.tool.*", "**"}),
    ("tuix.tool", {"**"}),
    ("x.tui.tool", {"**"}),
    ("a.z", {"a.**.z", "**"}),
    ("a.b.z", {"a.**.z", "**"}),
    ("a.b.c.z", {"a.**.z", "**"}),
    ("a.z.z", {"a.**.z", "**"}),
    ("a.z.b", {"**"}),
    ("a.zz", {"**"}),
    ("b.a.z", {"**"}),
    ("a", {"**"}),
    ("z", {"**"}),
    ("tui.x", {"tui.*", "tui.**", "**"}),
    ("dash.tool.end", {"*.tool.*", "**"}),
    ("a.tool.z", {"a.**.z", "*.tool.*", "**"}),
    ("tui.tool.start.more", {"tui.**", "**"}),
]


def test_patterns(http, ch):
    me = unique_name("tp-pub")
    readers = {}
    try:
        for p in PATTERNS:
            readers[p] = sse_events(p, ch, "SSE pattern %s" % p)
        # the same patterns on the default channel must see nothing of CH
        sent = []  # (topic, receipt, durable)
        for i, (topic, _) in enumerate(TOPICS):
            durable = i % 2 == 1 or i == len(TOPICS) - 1  # the last one commits all before it
            r = pub_http(http, topic, {"i": i}, durable=durable, channel=ch, frm=me)
            sent.append((topic, r, durable))
        # the same topics on another channel: nobody here may get them
        other = ch + "-other"
        for topic in ("tui.tool", "a.z", "tui"):
            pub_http(http, topic, {"i": -1}, channel=other, frm=me)

        for p in PATTERNS:
            want = [r["id"] for (t, r, _), (_, pats) in zip(sent, TOPICS) if p in pats]
            recs = exactly(readers[p], want, "pattern %r on channel %s" % (p, ch),
                           settle=SETTLE if p == PATTERNS[0] else 0.0)
            last = 0
            for rec, (topic, receipt, durable) in zip(
                    recs, [s for s, (_, pats) in zip(sent, TOPICS) if p in pats]):
                what = "pattern %r: %s" % (p, topic)
                check_sse_record(rec, what)
                check(topic_of(rec) == topic, "%s: topic %r" % (what, topic_of(rec)))
                check(rec["seq"] > last, "%s: seq %r not increasing (previous %r)" % (what, rec["seq"], last))
                last = rec["seq"]
                check(rec["channel"] == ch, "%s: channel %r, expected %r" % (what, rec["channel"], ch))
                check(rec["from"] == me, "%s: from %r, expected %r" % (what, rec["from"], me))
                check(rec["to"] == "", "%s: to %r, expected ''" % (what, rec["to"]))
                check(is_float(rec["raw"].get("ts")), "%s: message ts %r" % (what, rec["raw"].get("ts")))
                i = [t for t, _ in TOPICS].index(topic)
                check_stamped(rec["body"], topic, {"i": i}, what)
                if durable:
                    check(rec["seq"] == receipt["seq"] and rec["raw"]["ts"] == receipt["ts"],
                          "%s: delivered seq/ts %r/%r differ from the durable receipt %r"
                          % (what, rec["seq"], rec["raw"]["ts"], receipt))
        log("ok: patterns %s each got exactly their events, in order; other channels stay out"
            % ", ".join(PATTERNS))
        return readers["**"]
    except BaseException:
        stop_all(readers.values())
        raise
    finally:
        stop_all([r for p, r in readers.items() if p != "**"])


# ── (b) envelope stamping ─────────────────────────────────────────────────

def test_envelope(http, ch, everything):
    """``everything``: the ``**`` reader on ``ch`` from (a), still running."""
    before = len(everything.snapshot())
    given_id = unique_name("given-id")
    cases = [
        # topic, request kwargs, expected body (None = check_stamped with payload)
        ("stamp.none", dict(payload={}), None),
        ("stamp.nopayload", dict(omit_payload=True), None),
        ("stamp.keep.all",
         dict(payload={"type": "custom.kind", "ts": 42.5, "src": "elsewhere",
                       "x": [1, {"y": "\u00fc \u2713"}], "n": None}),
         {"type": "custom.kind", "ts": 42.5, "src": "elsewhere",
          "x": [1, {"y": "\u00fc \u2713"}], "n": None}),
        ("stamp.keep.some", dict(payload={"ts": 7, "src": None}, durable=True),
         "some"),
        ("stamp.keep.type", dict(payload={"type": "other.type", "k": "v"}, msg_id=given_id),
         "type"),
    ]
    receipts = []
    for topic, kw, _ in cases:
        receipts.append(pub_http(http, topic, channel=ch, **kw))
    pub_http(http, "stamp.barrier", {}, durable=True, channel=ch)
    everything.wait_for(lambda r: True, before + len(cases) + 1, WAIT, "the stamping events")
    recs = everything.snapshot()[before:]
    got = [topic_of(r) for r in recs]
    want = [t for t, _, _ in cases] + ["stamp.barrier"]
    check(got == want, "envelope events: got topics %r, expected %r" % (got, want))
    for rec, (topic, kw, expected), receipt in zip(recs, cases, receipts):
        body = rec["body"]
        what = "envelope %s" % topic
        check(rec["id"] == receipt["id"], "%s: message id %r != receipt id %r"
              % (what, rec["id"], receipt["id"]))
        if expected is None:
            check_stamped(body, topic, kw.get("payload") or {}, what)
        elif expected == "some":
            check(set(body) == {"type", "ts", "src"} and body["type"] == topic
                  and body["ts"] == 7 and is_int(body["ts"]) and body["src"] is None,
                  "%s: given ts 7 and src null must be kept as is and only type stamped; got %r"
                  % (what, body))
        elif expected == "type":
            check(rec["id"] == given_id, "%s: message id %r, expected the given %r"
                  % (what, rec["id"], given_id))
            check(set(body) == {"type", "k", "ts", "src"} and body["type"] == "other.type"
                  and body["k"] == "v" and body["src"] == "stamp",
                  "%s: given type must be kept, ts/src stamped; got %r" % (what, body))
            check_near_now(body["ts"], what)
        else:
            check(body == expected, "%s: all of type/ts/src given: body must be the payload "
                  "as is: expected %r, got %r" % (what, expected, body))
        check(topic_of(rec) == topic, "%s: message topic %r" % (what, topic_of(rec)))
    log("ok: envelope stamps only fill missing type/ts/src")


# ── (c) resume ────────────────────────────────────────────────────────────

def test_resume(http, ch):
    me = unique_name("rs-pub")
    readers = []
    try:
        first = sse_events("tui.**", ch, "SSE tui.** (first)")
        readers.append(first)
        ids = {}

        def pub(name, topic, durable=False):
            r = pub_http(http, topic, {"n": name}, durable=durable, channel=ch, frm=me)
            ids[name] = r["id"]
            return r

        pub("e1", "tui.r.1")
        pub("n1", "other.r.1")
        pub("e2", "tui.r.2", durable=True)
        pub("e3", "tui", durable=False)
        pub("n2", "tuiother", durable=True)
        recs = exactly(first, [ids["e1"], ids["e2"], ids["e3"]], "first stream")
        seq = {n: r["seq"] for n, r in zip(("e1", "e2", "e3"), recs)}
        first.stop()
        readers.remove(first)

        # while disconnected
        pub("e4", "tui.r.4")
        pub("n3", "r.tui.4", durable=True)
        pub("e5", "tui.r.5.deep", durable=True)
        pub("e6", "tui.r.6")
        pub("n4", "other.barrier", durable=True)

        second = sse_events("tui.**", ch, "SSE tui.** resumed (Last-Event-ID)",
                            last_event_id=seq["e3"])
        readers.append(second)
        second.wait_for(lambda r: True, 3, WAIT, "the 3 events of the gap")
        pub("e7", "tui.r.7")
        recs = exactly(second, [ids[n] for n in ("e4", "e5", "e6", "e7")],
                       "resume with Last-Event-ID %d" % seq["e3"])
        for rec in recs:
            check_sse_record(rec, "resumed stream")
            check(rec["seq"] > seq["e3"], "resumed stream: seq %r not after %r" % (rec["seq"], seq["e3"]))
        seq.update({n: r["seq"] for n, r in zip(("e4", "e5", "e6", "e7"), recs)})
        second.stop()
        readers.remove(second)
        log("ok: Last-Event-ID resumes exactly (gap delivered, nothing repeated, then live)")

        third = sse_events("tui.**", ch, "SSE tui.** after=%d" % seq["e1"], after=seq["e1"])
        readers.append(third)
        exactly(third, [ids[n] for n in ("e2", "e3", "e4", "e5", "e6", "e7")],
                "after=%d" % seq["e1"])
        third.stop()
        readers.remove(third)

        fourth = sse_events("tui.**", ch, "SSE tui.** Last-Event-ID over after=0",
                            after=0, last_event_id=seq["e5"])
        readers.append(fourth)
        exactly(fourth, [ids["e6"], ids["e7"]],
                "Last-Event-ID %d with after=0 (Last-Event-ID wins)" % seq["e5"])
        log("ok: after=SEQ starts after SEQ; Last-Event-ID wins over after")
    finally:
        stop_all(readers)


# ── (d) invalid topics ────────────────────────────────────────────────────

BAD = ["a..b", "", ".a", "a.", "."]


def test_invalid(http):
    for t in BAD:
        expect_error(http.post("/v1/events", json={"topic": t, "payload": {}}), 400,
                     "POST /v1/events topic %r" % t, code="invalid_topic")
        expect_error(http.post("/v1/events", json={"topic": t, "payload": {}, "durable": True}), 400,
                     "POST /v1/events durable topic %r" % t, code="invalid_topic")
    for p in ["a..b", ".a", "a."]:
        expect_error(http.get("/v1/events", params={"pattern": p}), 400,
                     "GET /v1/events?pattern=%r" % p, code="invalid_topic")
    agent = unique_name("badsub")
    for p in BAD:
        expect_error(http.post("/v1/agents/%s/subscriptions" % agent, json={"pattern": p}), 400,
                     "POST subscriptions pattern %r" % p, code="invalid_topic")
        expect_error(http.request("DELETE", "/v1/agents/%s/subscriptions" % agent,
                                  json={"pattern": p}), 400,
                     "DELETE subscriptions pattern %r" % p, code="invalid_topic")
    log("ok: invalid topics and patterns -> 400 invalid_topic")


# ── (e) durable agent subscriptions ───────────────────────────────────────

def subs_url(agent):
    return "/v1/agents/%s/subscriptions" % agent


def patterns_of(resp, what):
    body = expect_json(resp, 200, what)
    check(isinstance(body, dict) and list(body) == ["patterns"] and isinstance(body["patterns"], list),
          "%s: expected {\"patterns\": [...]}, got %r" % (what, body))
    return body["patterns"]


def inbox(http, agent, after=0, channel=None):
    params = {"after": str(after), "limit": "1000"}
    if channel is not None:
        params["channel"] = channel
    body = expect_json(http.get("/v1/agents/%s/inbox" % agent, params=params), 200,
                       "GET inbox of %s" % agent)
    check(isinstance(body, dict) and isinstance(body.get("messages"), list),
          "inbox of %s: %r" % (agent, body))
    return body["messages"]


def wait_inbox(http, agent, n, what, after=0):
    deadline = time.monotonic() + WAIT
    while True:
        msgs = inbox(http, agent, after)
        if len(msgs) >= n:
            return msgs
        if time.monotonic() >= deadline:
            fail("%s: timed out after %.0fs: inbox of %s has %d of %d messages: %r"
                 % (what, WAIT, agent, len(msgs), n, msgs))
        time.sleep(0.05)


def test_durable_subscriptions(http, other_ch):
    dash = unique_name("dash")
    me = unique_name("ds-pub")
    what = "subscriptions of %s" % dash
    check(patterns_of(http.get(subs_url(dash)), what) == [], "%s: not empty at first" % what)
    check(patterns_of(http.post(subs_url(dash), json={"pattern": "tui.**"}), what) == ["tui.**"],
          "%s: adding tui.** must answer [\"tui.**\"]" % what)
    got = patterns_of(http.post(subs_url(dash), json={"pattern": "tui.**"}), what)
    check(got == ["tui.**"], "%s: adding tui.** twice must keep one: %r" % (what, got))
    got = patterns_of(http.post(subs_url(dash), json={"pattern": "ops.*"}), what)
    check(sorted(got) == ["ops.*", "tui.**"], "%s: after adding ops.*: %r" % (what, got))
    got = patterns_of(http.get(subs_url(dash)), what)
    check(sorted(got) == ["ops.*", "tui.**"], "%s: GET lists %r" % (what, got))
    got = patterns_of(http.get(subs_url(dash), params={"channel": other_ch}), what)
    check(got == [], "%s: GET on channel %s lists %r (subscriptions are per channel)"
          % (what, other_ch, got))
    got = patterns_of(http.request("DELETE", subs_url(dash), json={"pattern": "ops.*"}), what)
    check(got == ["tui.**"], "%s: after DELETE ops.*: %r" % (what, got))
    check(patterns_of(http.get(subs_url(dash)), what) == ["tui.**"], "%s: GET after DELETE" % what)

    ids = {}

    def pub(name, topic, durable=False, channel=None):
        ids[name] = pub_http(http, topic, {"n": name}, durable=durable, channel=channel, frm=me)["id"]

    pub("m1", "tui.a")
    pub("x1", "x.tui", durable=True)
    pub("m2", "tui.b.c", durable=True)
    pub("x2", "tuix")
    pub("x3", "ops.q")  # ops.* was removed
    pub("m3", "tui")
    pub("x4", "tui.z", channel=other_ch)  # another channel
    pub("m4", "tui.last", durable=True)
    want = [ids[n] for n in ("m1", "m2", "m3", "m4")]
    msgs = wait_inbox(http, dash, 4, "durable subscription tui.**")
    time.sleep(0.3)
    msgs = inbox(http, dash)
    got = [m.get("id") for m in msgs]
    check(got == want, "inbox of %s: got ids %r (bodies %r), expected exactly the tui.** events %r"
          % (dash, got, [m.get("body") for m in msgs], want))
    topics = {"m1": "tui.a", "m2": "tui.b.c", "m3": "tui", "m4": "tui.last"}
    last = 0
    for m, name in zip(msgs, ("m1", "m2", "m3", "m4")):
        w = "inbox of %s: %s" % (dash, name)
        check(m.get("channel") == "default" and m.get("from") == me,
              "%s: channel/from %r/%r" % (w, m.get("channel"), m.get("from")))
        check(is_int(m.get("seq")) and m["seq"] > last, "%s: seq %r not increasing" % (w, m.get("seq")))
        last = m["seq"]
        check_stamped(m.get("body"), topics[name], {"n": name}, w)
    check(inbox(http, dash, channel=other_ch) == [],
          "inbox of %s on %s is not empty: the subscription is on default only" % (dash, other_ch))

    # the agent-bus /recv view of the same inbox
    r = expect_json(http.get("/recv", params={"to": dash, "since": "0", "block": "false"}), 200,
                    "GET /recv?to=%s" % dash)
    rids = [m.get("id") for m in r.get("messages", [])]
    check(rids == want, "/recv?to=%s: got ids %r, expected %r" % (dash, rids, want))
    for m, im in zip(r["messages"], msgs):
        try:
            rb = json.loads(m.get("msg"))
        except (TypeError, ValueError):
            fail("/recv?to=%s: msg %r is not the body's JSON" % (dash, m.get("msg")))
        check(rb == im["body"], "/recv?to=%s: msg %r != inbox body %r" % (dash, rb, im["body"]))
    log("ok: durable subscription tui.** filled %s's inbox with exactly the matching events" % dash)

    got = patterns_of(http.request("DELETE", subs_url(dash), json={"pattern": "tui.**"}), what)
    check(got == [], "%s: after DELETE tui.**: %r" % (what, got))
    check(patterns_of(http.get(subs_url(dash)), what) == [], "%s: GET after DELETE all" % what)
    pub("y1", "tui.after.delete")
    pub("y2", "tui.after.delete.durable", durable=True)
    # a direct message after them: once it is there, they would be too
    sent = expect_json(http.post("/v1/messages", json={"from": me, "to": dash,
                                                       "body": {"sentinel": True}}),
                       200, "POST /v1/messages sentinel")
    msgs = wait_inbox(http, dash, 1, "the sentinel after DELETE", after=last)
    time.sleep(0.3)
    msgs = inbox(http, dash, after=last)
    check([m.get("id") for m in msgs] == [sent["id"]],
          "after DELETE tui.**, events still land in %s's inbox: %r" % (dash, msgs))
    log("ok: list/DELETE work; after DELETE nothing new lands")


# ── (f) Unix socket ───────────────────────────────────────────────────────

def expect_unix_error(conn, req, code, what):
    conn.send_obj(req)
    conn.expect_error(code, what)


def test_unix(http, other_ch):
    me = unique_name("ux-pub")
    with RawConn() as s, RawConn() as p:
        for bad in ["a..b", "", ".x", "tui..**"]:
            expect_unix_error(s, {"type": "subscribe", "pattern": bad}, "invalid_topic",
                              "unix subscribe %r" % bad)
        s.ping("after bad patterns")
        r = s.request({"type": "subscribe", "pattern": "tui.**"}, what="subscribed")
        check(r == {"type": "subscribed", "pattern": "tui.**", "durable": False},
              "unix subscribe tui.**: reply %r" % r)
        # an unregistered connection cannot subscribe durably
        r = s.request({"type": "subscribe", "pattern": "tui.**", "durable": True},
                      what="durable subscribe unregistered")
        check(r.get("type") == "error",
              "durable subscribe on an unregistered connection: expected an error, got %r" % r)

        for bad in ["a..b", ""]:
            expect_unix_error(p, {"type": "publish", "topic": bad, "payload": {}}, "invalid_topic",
                              "unix publish %r" % bad)
            expect_unix_error(p, {"type": "publish", "topic": bad, "payload": {}, "durable": True},
                              "invalid_topic", "unix durable publish %r" % bad)

        want = []
        h = pub_http(http, "tui.http", {"k": 1}, frm=me)
        want.append(("tui.http", h["id"], me, {"k": 1}))
        pub_http(http, "other.http", {"k": 2}, frm=me)
        given = unique_name("uid")
        u1 = pub_unix(p, "tui.unix", {"k": 3}, msg_id=given)
        want.append(("tui.unix", u1["id"], "anonymous", {"k": 3}))
        pub_unix(p, "other.unix", {"k": 4}, durable=True)
        pub_unix(p, "tui.elsewhere", {"k": 5}, channel=other_ch)
        pub_http(http, "tui.elsewhere", {"k": 6}, channel=other_ch)
        u2 = pub_unix(p, "tui.unix.durable", {"k": 7}, durable=True, frm=me)
        want.append(("tui.unix.durable", u2["id"], me, {"k": 7}))
        u3 = pub_unix(s, "tui.self", {"k": 8})  # on the subscribed connection itself
        want.append(("tui.self", u3["id"], "anonymous", {"k": 8}))
        pub_unix(p, "zz.barrier", {}, durable=True)

        got = []
        deadline = time.monotonic() + WAIT
        while len(got) < len(want):
            remaining = deadline - time.monotonic()
            f = s.recv_or_none(remaining) if remaining > 0 else None
            if f is None:
                fail("unix subscriber: timed out; got %r, expected topics %r"
                     % ([g.get("topic") for g in got], [w[0] for w in want]))
            got.append(f)
        got.extend(s.collect(SETTLE))
        check([g.get("topic") for g in got] == [w[0] for w in want],
              "unix subscriber tui.**: got %r, expected exactly topics %r"
              % (got, [w[0] for w in want]))
        last = 0
        for f, (topic, mid, frm, extra) in zip(got, want):
            what = "unix subscriber: %s" % topic
            check(f.get("type") == "message", "%s: not a message frame: %r" % (what, f))
            check(f.get("id") == mid, "%s: id %r, expected %r" % (what, f.get("id"), mid))
            check(f.get("from") == frm, "%s: from %r, expected %r" % (what, f.get("from"), frm))
            check(f.get("channel") == "default", "%s: channel %r" % (what, f.get("channel")))
            check(is_int(f.get("seq")) and f["seq"] > last, "%s: seq %r not increasing" % (what, f.get("seq")))
            last = f["seq"]
            check_stamped(f.get("body"), topic, extra, what)
        check(got[2]["seq"] == u2["seq"], "unix: delivered seq %r != durable reply seq %r"
              % (got[2]["seq"], u2["seq"]))
        s.ping("subscriber still answers")
    log("ok: unix subscribe delivers exactly the matching events (HTTP, unix, same connection)")

    # a live subscription on a registered connection follows its channel
    with RawConn() as reg, RawConn() as p:
        reg.register(unique_name("uxch"), channel=other_ch)
        r = reg.request({"type": "subscribe", "pattern": "tui.**"}, what="subscribed")
        check(r == {"type": "subscribed", "pattern": "tui.**", "durable": False},
              "unix subscribe on a registered connection: reply %r" % r)
        pub_http(http, "tui.on.default", {}, frm=me)
        pub_unix(p, "tui.on.default.unix", {}, durable=True, frm=me)
        a = pub_http(http, "tui.on.other", {"k": 1}, channel=other_ch, frm=me)
        b = pub_unix(p, "tui.on.other.unix", {"k": 2}, channel=other_ch, durable=True, frm=me)
        f1 = reg.recv_message(lambda m: True, WAIT, "tui.on.other on %s" % other_ch)
        f2 = reg.recv_message(lambda m: True, WAIT, "tui.on.other.unix on %s" % other_ch)
        extra = reg.collect(SETTLE)
        got = [(f.get("topic"), f.get("id"), f.get("channel")) for f in [f1, f2] + extra]
        want = [("tui.on.other", a["id"], other_ch), ("tui.on.other.unix", b["id"], other_ch)]
        check(got == want, "unix subscribe on a connection registered on %s: got %r, expected "
              "exactly %r (the connection's channel only)" % (other_ch, got, want))
    log("ok: unix subscribe on a registered connection follows its channel")

    # durable subscription on a registered connection
    agent = unique_name("unixdur")
    ids = {}
    r = RawConn()
    try:
        r.register(agent)
        reply = r.request({"type": "subscribe", "pattern": "tui.**", "durable": True},
                          what="durable subscribed")
        check(reply == {"type": "subscribed", "pattern": "tui.**", "durable": True},
              "unix durable subscribe: reply %r" % reply)
        check(patterns_of(http.get(subs_url(agent)), "subscriptions of %s" % agent) == ["tui.**"],
              "unix durable subscribe: not listed by GET subscriptions of %s" % agent)
        with RawConn() as p:
            ids["d1"] = pub_http(http, "tui.d.1", {"n": "d1"}, frm=me)["id"]
            pub_http(http, "x.d.2", {"n": "x"}, frm=me)
            ids["d2"] = pub_unix(p, "tui.d.2", {"n": "d2"}, durable=True, frm=me)["id"]
            pub_unix(p, "tui.d.other", {"n": "x"}, channel=other_ch, frm=me)
            ids["d3"] = pub_unix(p, "tui", {"n": "d3"}, frm=me)["id"]
            want = [ids["d1"], ids["d2"], ids["d3"]]
            got = []
            deadline = time.monotonic() + WAIT
            while len(got) < 3:
                remaining = deadline - time.monotonic()
                f = r.recv_or_none(remaining) if remaining > 0 else None
                if f is None:
                    fail("registered %s: timed out; got %r, expected ids %r" % (agent, got, want))
                got.append(f)
            got.extend(r.collect(SETTLE))
            check([f.get("id") for f in got] == want,
                  "registered %s with durable tui.**: got %r, expected exactly ids %r"
                  % (agent, got, want))
            for f, t in zip(got, ("tui.d.1", "tui.d.2", "tui")):
                check(f.get("type") == "message" and f.get("topic") == t,
                      "registered %s: frame %r, expected a message with topic %r" % (agent, f, t))
                check_stamped(f.get("body"), t, {"n": {"tui.d.1": "d1", "tui.d.2": "d2", "tui": "d3"}[t]},
                              "registered %s: %s" % (agent, t))
            msgs = inbox(http, agent)
            check([m.get("id") for m in msgs] == want,
                  "inbox of %s: %r, expected ids %r" % (agent, msgs, want))
            r.close()
            # while offline: still lands, delivered on the next registration
            ids["d4"] = pub_http(http, "tui.d.4", {"n": "d4"}, durable=True, frm=me)["id"]
            pub_http(http, "x.d.5", {"n": "x"}, durable=True, frm=me)
        r = RawConn()
        r.register(agent)
        f = r.recv_message(lambda m: True, WAIT, "the event published while %s was offline" % agent)
        check(f.get("id") == ids["d4"] and f.get("topic") == "tui.d.4",
              "registered %s again: expected the offline event tui.d.4 (%s) first, got %r"
              % (agent, ids["d4"], f))
        extra = r.collect(SETTLE)
        check(extra == [], "registered %s again: unexpected frames %r" % (agent, extra))
    finally:
        r.close()
    log("ok: durable unix subscription lands in the inbox and is delivered on the registered connection")


# ── (g) v1 WebSocket ──────────────────────────────────────────────────────

def ws_request(ws, obj, what):
    """Send ``obj`` on ``ws``; the next non-message frame is the reply."""
    with ws._lock:
        start = len(ws.others)
    ws.send(obj)
    deadline = time.monotonic() + WAIT
    while True:
        ws.check_alive()
        with ws._lock:
            others = list(ws.others[start:])
        if others:
            check(len(others) == 1, "%s: more than one reply: %r" % (what, others))
            return others[0]
        if time.monotonic() >= deadline:
            fail("%s: no reply within %.0fs" % (what, WAIT))
        time.sleep(0.02)


def test_websocket(http, other_ch):
    me = unique_name("ws-pub")
    live_agent = unique_name("wslive")
    dur_agent = unique_name("wsdur")
    readers = []
    try:
        ws = WSReader(live_agent).start()
        readers.append(ws)
        for bad in ["a..b", ""]:
            r = ws_request(ws, {"type": "subscribe", "pattern": bad}, "ws subscribe %r" % bad)
            check(r.get("type") == "error" and r.get("code") == "invalid_topic",
                  "ws subscribe %r: expected error invalid_topic, got %r" % (bad, r))
            r = ws_request(ws, {"type": "publish", "topic": bad, "payload": {}}, "ws publish %r" % bad)
            check(r.get("type") == "error" and r.get("code") == "invalid_topic",
                  "ws publish %r: expected error invalid_topic, got %r" % (bad, r))
        r = ws_request(ws, {"type": "subscribe", "pattern": "tui.*"}, "ws subscribe tui.*")
        check(r == {"type": "subscribed", "pattern": "tui.*", "durable": False},
              "ws subscribe tui.*: reply %r" % r)
        want = []
        r = ws_request(ws, {"type": "publish", "topic": "tui.ws", "payload": {"k": 1}}, "ws publish")
        check(r.get("type") == "published" and set(r) == {"type", "id"} and isinstance(r.get("id"), str),
              "ws fast publish: reply %r, expected exactly {type: published, id}" % r)
        want.append(("tui.ws", r["id"], live_agent, {"k": 1}))
        r = ws_request(ws, {"type": "publish", "topic": "tui.ws.deep", "payload": {}}, "ws publish")
        check(r.get("type") == "published", "ws publish tui.ws.deep: %r" % r)
        r = ws_request(ws, {"type": "publish", "topic": "tui.wsd", "payload": {"k": 2},
                            "durable": True, "from": me}, "ws durable publish")
        check(r.get("type") == "published" and set(r) == {"type", "id", "seq", "ts"}
              and is_int(r.get("seq")) and is_float(r.get("ts")),
              "ws durable publish: reply %r, expected {type, id, seq: int, ts: float}" % r)
        want.append(("tui.wsd", r["id"], me, {"k": 2}))
        r = ws_request(ws, {"type": "publish", "topic": "tui.elsewhere", "payload": {},
                            "channel": other_ch}, "ws publish other channel")
        check(r.get("type") == "published", "ws publish on %s: %r" % (other_ch, r))
        h = pub_http(http, "tui.http", {"k": 3}, frm=me)
        want.append(("tui.http", h["id"], me, {"k": 3}))
        pub_http(http, "tui", {"k": 4}, durable=True, frm=me)  # tui.* does not match tui
        recs = exactly(ws, [w[1] for w in want], "ws live subscription tui.*")
        for rec, (topic, mid, frm, extra) in zip(recs, want):
            what = "ws live: %s" % topic
            check(topic_of(rec) == topic and rec["from"] == frm and rec["channel"] == "default",
                  "%s: frame %r (expected from %r)" % (what, rec["raw"], frm))
            check_stamped(rec["body"], topic, extra, what)
        log("ok: v1 WebSocket live subscribe + publish")

        wd = WSReader(dur_agent).start()
        readers.append(wd)
        r = ws_request(wd, {"type": "subscribe", "pattern": "ops.**", "durable": True},
                       "ws durable subscribe")
        check(r == {"type": "subscribed", "pattern": "ops.**", "durable": True},
              "ws durable subscribe: reply %r" % r)
        check(patterns_of(http.get(subs_url(dur_agent)), "subscriptions of %s" % dur_agent)
              == ["ops.**"], "ws durable subscribe: not listed for %s" % dur_agent)
        a = pub_http(http, "ops", {"k": 1}, frm=me)
        pub_http(http, "opsx.y", {"k": 2}, frm=me)
        b = pub_http(http, "ops.deploy.done", {"k": 3}, durable=True, frm=me)
        want = [a["id"], b["id"]]
        recs = exactly(wd, want, "ws durable subscription ops.** delivered on the WebSocket")
        for rec, t in zip(recs, ("ops", "ops.deploy.done")):
            check(topic_of(rec) == t, "ws durable: topic %r, expected %r" % (topic_of(rec), t))
        check([m.get("id") for m in inbox(http, dur_agent)] == want,
              "ws durable: inbox of %s %r, expected ids %r" % (dur_agent, inbox(http, dur_agent), want))
        log("ok: v1 WebSocket durable subscribe delivers through the inbox")
    finally:
        stop_all(readers)


def main():
    with client() as http:
        ch = unique_name("tp")
        everything = test_patterns(http, ch)
        try:
            test_envelope(http, ch, everything)
        finally:
            everything.stop()
        test_resume(http, unique_name("rs"))
        test_invalid(http)
        other_ch = unique_name("elsewhere")
        test_durable_subscriptions(http, other_ch)
        test_unix(http, other_ch)
        test_websocket(http, other_ch)


if __name__ == "__main__":
    run(main)
