"""Three hermod nodes on one NATS JetStream cluster, each with other clients.

Node A (``HERMOD_SOCKET``, ``HERMOD_URL_A``): the PyPI hermes-bus client
(alice), and fast topic events published over HTTP.
Node B (``HERMOD_URL_B``): the agent-bus scripts' calls -- ``POST /send`` and
the ``GET /recv?block=true`` loop (bob).
Node C (``HERMOD_URL_C``): an SSE-interop ``/subscribe`` stream (carol) and a
v1 ``/v1/agents/{name}/stream`` (dave).

Direct messages in every direction between the nodes, a broadcast from node
C, durable topic events published on node B that node C's subscriber
added, and fast topic events from node A to a pattern stream on node C: every message arrives at its one reader, in send order, exactly
once, and nothing else arrives.
"""
import os
import time

import httpx

from common import Inbox, check, client_send, log, new_client, run, stop_client, unique_name
from httpbus import (RecvPoller, SSEReader, expect_json, interop_stream, is_interop_notice,
                     norm_frame, stop_all, v1_stream)

N = 20
TIMEOUT = 30.0


def url(var):
    value = os.environ.get(var)
    check(value, "%s is not set" % var)
    return value.rstrip("/")


def in_order(got, want, what):
    check(got == want, "%s: got %d %r, expected exactly %d %r (in order, once each)"
          % (what, len(got), got, len(want), want))


def main():
    b, c = url("HERMOD_URL_B"), url("HERMOD_URL_C")
    http_b = httpx.Client(base_url=b, timeout=10.0)
    http_c = httpx.Client(base_url=c, timeout=10.0)
    tag = unique_name("x")
    alice, bob, carol, dave = ("%s-%s" % (n, tag) for n in ("alice", "bob", "carol", "dave"))

    # Everyone connects to their own node first.
    a_client = new_client(alice)
    a_inbox = Inbox(a_client)
    bob_recv = RecvPoller(bob, base=b).start()
    carol_sse = interop_stream(carol, base=c).start()
    dave_sse = v1_stream(dave, base=c).start()
    receivers = [bob_recv, carol_sse, dave_sse]
    try:
        for r in receivers:
            r.wait_ready()

        # alice (A, hermes-bus) -> bob (B, agent-bus /recv) and dave (C, v1 SSE)
        for i in range(N):
            client_send(a_client, bob, {"text": "a2b %d" % i})
            client_send(a_client, dave, {"text": "a2d %d" % i})
        # bob (B, agent-bus /send) -> alice (A) and carol (C, interop SSE)
        for i in range(N):
            for to, text in ((alice, "b2a %d" % i), (carol, "b2c %d" % i)):
                r = expect_json(http_b.post("/send", json={"from": bob, "to": to, "msg": text}),
                                200, "POST /send on B to %s" % to)
                check(r.get("ok") is True, "POST /send on B: %r" % r)
        # dave (C, v1) -> alice (A)
        for i in range(N):
            expect_json(http_c.post("/v1/messages", json={"from": dave, "to": alice,
                                                          "body": {"text": "d2a %d" % i}}),
                        200, "POST /v1/messages on C")
        log("sent %d direct messages across three nodes" % (5 * N))

        got = bob_recv.wait_for(lambda r: r["from"] == alice, N, TIMEOUT, "alice's messages on B")
        in_order([r["msg"] for r in got], ["a2b %d" % i for i in range(N)], "bob's /recv on B")
        got = dave_sse.wait_for(lambda r: r["from"] == alice, N, TIMEOUT, "alice's messages on C")
        in_order([r["body"]["text"] for r in got], ["a2d %d" % i for i in range(N)],
                 "dave's v1 stream on C")
        got = carol_sse.wait_for(lambda r: r["from"] == bob, N, TIMEOUT, "bob's messages on C")
        in_order([r["body"]["text"] for r in got], ["b2c %d" % i for i in range(N)],
                 "carol's interop stream on C")

        def texts_from(sender):
            return [m["body"].get("text") for m in a_inbox.messages(lambda f: f.get("from") == sender)]
        deadline = time.monotonic() + TIMEOUT
        while (len(texts_from(bob)) < N or len(texts_from(dave)) < N) and time.monotonic() < deadline:
            time.sleep(0.05)
        in_order(texts_from(bob), ["b2a %d" % i for i in range(N)], "alice's hermes-bus client on A (from bob)")
        in_order(texts_from(dave), ["d2a %d" % i for i in range(N)], "alice's hermes-bus client on A (from dave)")
        log("direct messages: all arrived, in order, once")

        # A broadcast from node C's interop front reaches the agents of every node.
        r = expect_json(http_c.post("/broadcast", params={"from": carol},
                                    json={"text": "all hands %s" % tag}), 200, "POST /broadcast on C")
        check(r.get("delivered") is True and r.get("recipients", 0) >= 3,
              "POST /broadcast on C: %r (alice, bob and dave are known on every node)" % r)
        bcast = lambda rec: rec["from"] == carol  # noqa: E731
        bob_recv.wait_for(bcast, 1, TIMEOUT, "the broadcast on B")
        dave_sse.wait_for(bcast, 1, TIMEOUT, "the broadcast on C")
        a_inbox.wait_message(lambda f: f.get("from") == carol, TIMEOUT, "the broadcast on A")
        log("broadcast from C reached A, B and C")

        # dave (on C) subscribes durably; topic events published on B land in
        # his inbox and reach his stream on C.
        subs = "/v1/agents/%s/subscriptions" % dave
        expect_json(http_c.post(subs, json={"pattern": "work.**"}), 200, "subscribe dave on C")
        topics = ["work.start", "work.a.b", "play.x", "work", "work.done"]
        for i, topic in enumerate(topics):
            expect_json(http_b.post("/v1/events", json={"topic": topic, "payload": {"n": i},
                                                        "durable": True, "from": bob}),
                        200, "POST /v1/events %s on B" % topic)
        got = dave_sse.wait_for(lambda rec: rec["raw"].get("topic") is not None, 4, TIMEOUT,
                                "topic events on C")
        in_order([rec["raw"]["topic"] for rec in got], ["work.start", "work.a.b", "work", "work.done"],
                 "dave's topic events on C (work.** matches work itself, not play.x)")
        log("durable topic events from B reached the subscriber on C")

        # Fast (non-durable) events published on A reach a pattern stream on C.
        fast = SSEReader("/v1/events", "SSE /v1/events?pattern=fast.* on C",
                         params={"pattern": "fast.*"}, normalise=norm_frame, base=c).start()
        receivers.append(fast)
        fast.wait_ready()
        http_a = httpx.Client(base_url=url("HERMOD_URL_A"), timeout=10.0)
        for i in range(N):
            r = expect_json(http_a.post("/v1/events", json={"topic": "fast.e%d" % i, "payload": {"n": i}}),
                            200, "POST /v1/events fast.e%d on A" % i)
            check(r.get("seq") is None, "a fast publish answers before it is stored: %r" % r)
        got = fast.wait_for(lambda rec: True, N, TIMEOUT, "fast events on C")
        in_order([rec["raw"]["topic"] for rec in got], ["fast.e%d" % i for i in range(N)],
                 "fast events from A on C's pattern stream")
        log("fast topic events from A reached the pattern stream on C")

        # Nothing arrived twice or unasked for, anywhere.
        time.sleep(1.0)
        for rec_list, what, want in (
            ([r for r in bob_recv.snapshot()], "bob", N + 1),
            ([r for r in carol_sse.snapshot() if not is_interop_notice(r) and r["from"] != carol],
             "carol", N),
            ([r for r in dave_sse.snapshot()], "dave", N + 1 + 4),
        ):
            ids = [r["id"] for r in rec_list]
            check(len(ids) == len(set(ids)), "%s got a message twice: %r" % (what, ids))
            check(len(ids) == want, "%s got %d messages, expected %d: %r"
                  % (what, len(ids), want, [r.get("body") or r.get("msg") for r in rec_list]))
        msgs = a_inbox.messages()
        ids = [m.get("id") for m in msgs]
        check(len(ids) == len(set(ids)) == 2 * N + 1,
              "alice got %d messages (%d distinct), expected %d" % (len(ids), len(set(ids)), 2 * N + 1))
        log("no duplicates, nothing extra")
    finally:
        stop_all(receivers)
        stop_client(a_client)


if __name__ == "__main__":
    run(main)
