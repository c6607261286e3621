"""agent-bus ``GET /recv`` long-poll semantics.

Proves:

1. ``block=false`` on an empty inbox answers at once (< 1 s) with no messages
   and a float ``now``.
2. ``block=true`` with ``since`` = now is really held (still open after
   1.5 s) and returns right after another client sends (v1 ``POST
   /v1/messages``), well inside the 30 s hold (< 5 s after the send), with
   exactly that message (``from``, ``msg`` by the crossing rule, ``channel``,
   ``seq``/``id`` of the receipt).  The same with ``POST /send`` as sender.
3. Paging: 5 messages, then ``max=2`` returns the 2 oldest; advancing
   ``since`` = max(largest ts received, now) each time, the next calls return
   3-4, then 5, then nothing: no skips, no repeats, ts strictly increasing;
   ``max`` is never exceeded; ``since`` = a message's exact ts excludes it.
4. Under load -- two clients sending 150 messages each concurrently (``POST
   /send`` and ``POST /v1/messages``) while a reader pages with
   ``block=true&max=7`` and the since rule -- the reader gets all 300 exactly
   once, each sender's messages in order: ``now`` never passes a message that
   is still being committed.
5. Channels: plain ``/recv`` sees only ``default``, ``channel=CH`` only CH,
   ``channel=*`` both (each item naming its channel, oldest first); a
   ``block=true&channel=*`` poll wakes up for a message on another channel.
6. A ``since`` ahead of the bus clock: a held ``block=true`` poll does not
   return a message sent meanwhile (its ts is not newer than ``since``), and
   a poll from 0 still gets it.
"""
import os
import sys
import threading
import time

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import check, fail, is_int, log, run, unique_name  # noqa: E402
import httpbus  # noqa: E402
from httpbus import expect_json  # noqa: E402

WAKE_LIMIT = 5.0


def recv(http, to, since, block=False, max_=None, channel=None, context="recv"):
    params = {"to": to, "since": repr(since), "block": "true" if block else "false"}
    if max_ is not None:
        params["max"] = str(max_)
    if channel is not None:
        params["channel"] = channel
    body = expect_json(http.get("/recv", params=params), 200, "GET /recv (%s)" % context)
    check(isinstance(body, dict) and isinstance(body.get("messages"), list)
          and isinstance(body.get("now"), float),
          "%s: /recv reply is not {messages: [...], now: float}: %r" % (context, body))
    for m in body["messages"]:
        check(isinstance(m, dict) and isinstance(m.get("ts"), float) and isinstance(m.get("from"), str)
              and isinstance(m.get("msg"), str) and isinstance(m.get("channel"), str)
              and is_int(m.get("seq")) and isinstance(m.get("id"), str),
              "%s: item is not {ts, from, msg, channel, seq, id}: %r" % (context, m))
    return body


def advance(since, reply):
    """The agent-bus client rule: since = max(largest ts received, now)."""
    newest = max([m["ts"] for m in reply["messages"]] + [since])
    return max(newest, reply["now"])


def send_ab(http, frm, to, msg, channel=None):
    req = {"from": frm, "to": to, "msg": msg}
    if channel is not None:
        req["channel"] = channel
    r = expect_json(http.post("/send", json=req), 200, "POST /send %r" % msg)
    check(r.get("ok") is True and isinstance(r.get("ts"), float) and is_int(r.get("seq")),
          "POST /send: unexpected reply %r" % r)
    return r


def send_v1(http, frm, to, body):
    r = expect_json(http.post("/v1/messages", json={"from": frm, "to": to, "body": body}), 200,
                    "POST /v1/messages")
    check(is_int(r.get("seq")) and isinstance(r.get("id"), str), "POST /v1/messages: reply %r" % r)
    return r


class BlockedRecv:
    """A ``block=true`` /recv running in a thread (own client)."""

    def __init__(self, to, since, channel=None):
        self.result = None
        self.error = None
        self.returned_at = None
        self.started_at = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(to, since, channel), daemon=True)
        self.thread.start()

    def _run(self, to, since, channel):
        try:
            with httpbus.client(timeout=httpbus.LONG_POLL_TIMEOUT) as c:
                self.result = recv(c, to, since, block=True, channel=channel, context="blocked recv")
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            self.error = "%s: %s" % (type(e).__name__, e)
        finally:
            self.returned_at = time.monotonic()

    def finished(self):
        return not self.thread.is_alive()

    def wait(self, timeout):
        self.thread.join(timeout)
        if self.thread.is_alive():
            return False
        if self.error:
            fail("blocked /recv failed: %s" % self.error)
        return True


def test_nonblocking_empty(http):
    me = unique_name("lp-empty")
    t0 = time.monotonic()
    r = recv(http, me, 0.0, block=False, context="block=false on an empty inbox")
    took = time.monotonic() - t0
    check(r["messages"] == [], "block=false on an empty inbox returned messages: %r" % r)
    check(took < 1.0, "block=false took %.2fs (should answer at once)" % took)
    # the default is non-blocking too
    t0 = time.monotonic()
    body = expect_json(http.get("/recv", params={"to": me}), 200, "GET /recv without block")
    check(body.get("messages") == [], "GET /recv without block: %r" % body)
    check(time.monotonic() - t0 < 1.0, "GET /recv without block= held the request")
    log("block=false: empty answer in %.3fs" % took)


def test_wakeup(http, sender_kind):
    me = unique_name("lp-wake")
    peer = unique_name("lp-peer")
    first = recv(http, me, 0.0, context="initial")
    since = advance(0.0, first)
    blocked = BlockedRecv(me, since)
    time.sleep(1.5)
    check(not blocked.finished(),
          "block=true with since=now returned before anything was sent: %r / %s"
          % (blocked.result, blocked.error))
    text = "wake up ⏰ %s" % me
    t_send = time.monotonic()
    if sender_kind == "v1":
        receipt = send_v1(http, peer, me, {"text": text})
    else:
        receipt = send_ab(http, peer, me, text)
    t_durable = time.monotonic()
    if not blocked.wait(WAKE_LIMIT + 1.0):
        fail("block=true /recv still held %.1fs after a %s send (the hold is 30 s; it must "
             "return when a message arrives)" % (time.monotonic() - t_send, sender_kind))
    latency = blocked.returned_at - t_send
    check(latency < WAKE_LIMIT, "blocked /recv returned %.2fs after the send (limit %.0fs)"
          % (latency, WAKE_LIMIT))
    msgs = blocked.result["messages"]
    check(len(msgs) == 1, "blocked /recv returned %d messages, expected the one sent: %r"
          % (len(msgs), msgs))
    m = msgs[0]
    check(m["from"] == peer and m["msg"] == text and m["channel"] == "default"
          and m["seq"] == receipt["seq"] and m["id"] == receipt["id"],
          "blocked /recv returned %r, expected from=%r msg=%r channel=default seq=%r id=%r"
          % (m, peer, text, receipt["seq"], receipt["id"]))
    check(m["ts"] > since, "returned message ts %r is not > since %r" % (m["ts"], since))
    # no repeat afterwards
    again = recv(http, me, advance(since, blocked.result), context="after the wake-up")
    check(again["messages"] == [], "the message came again after advancing since: %r" % again)
    log("block=true woke %.3fs after the %s send (%.3fs after it was durable)"
        % (latency, sender_kind, blocked.returned_at - t_durable))


def test_paging(http):
    me = unique_name("lp-page")
    peer = unique_name("lp-src")
    start = recv(http, me, 0.0, context="initial")
    since = advance(0.0, start)
    sent = [send_ab(http, peer, me, "page %d ✓" % i) for i in range(5)]
    ts_sent = [r["ts"] for r in sent]
    check(all(a < b for a, b in zip(ts_sent, ts_sent[1:])),
          "send receipts' ts not strictly increasing: %r" % ts_sent)
    got = []
    expected_batches = [2, 2, 1, 0]
    for i, want in enumerate(expected_batches):
        r = recv(http, me, since, max_=2, context="page %d" % i)
        texts = [m["msg"] for m in r["messages"]]
        check(len(r["messages"]) <= 2, "max=2 returned %d messages: %r" % (len(texts), texts))
        check(len(r["messages"]) == want,
              "page %d: expected %d messages, got %r (since=%r, now=%r)"
              % (i, want, texts, since, r["now"]))
        for m in r["messages"]:
            check(m["ts"] > since, "page %d: message ts %r not > since %r" % (i, m["ts"], since))
        got.extend(r["messages"])
        since = advance(since, r)
    texts = [m["msg"] for m in got]
    check(texts == ["page %d ✓" % i for i in range(5)],
          "paging with max=2 gave %r, expected page 0..4 in order, no skips or repeats" % texts)
    check([m["seq"] for m in got] == [r["seq"] for r in sent],
          "paged seqs %r != send receipts %r" % ([m["seq"] for m in got], [r["seq"] for r in sent]))
    check([m["ts"] for m in got] == ts_sent,
          "paged ts %r != send receipts %r" % ([m["ts"] for m in got], ts_sent))
    # since = the exact ts of message 2 returns 3 and 4 only
    r = recv(http, me, got[2]["ts"], context="since = ts of message 2")
    check([m["msg"] for m in r["messages"]] == ["page 3 ✓", "page 4 ✓"],
          "since = ts of message 2 returned %r, expected messages 3 and 4"
          % [m["msg"] for m in r["messages"]])
    # a default max returns all 5 from the start
    r = recv(http, me, 0.0, context="everything")
    check([m["msg"] for m in r["messages"]] == texts, "since=0 returned %r" % r["messages"])
    check(r["now"] >= got[-1]["ts"], "now %r is before the newest message ts %r"
          % (r["now"], got[-1]["ts"]))
    log("paging max=2: 2+2+1+0, no skips or repeats")


def test_concurrent(http):
    me = unique_name("lp-load")
    senders = [unique_name("lp-ab"), unique_name("lp-v1")]
    n = 150
    start = recv(http, me, 0.0, context="initial")
    since = advance(0.0, start)
    errors = []

    def pump(kind, frm):
        try:
            with httpbus.client() as c:
                for i in range(n):
                    if kind == "ab":
                        send_ab(c, frm, me, "%s %d" % (frm, i))
                    else:
                        send_v1(c, frm, me, {"text": "%s %d" % (frm, i)})
        except Exception as e:  # noqa: BLE001
            errors.append("%s sender: %s: %s" % (kind, type(e).__name__, e))

    threads = [threading.Thread(target=pump, args=("ab", senders[0]), daemon=True),
               threading.Thread(target=pump, args=("v1", senders[1]), daemon=True)]
    for t in threads:
        t.start()
    got = []
    calls = 0
    deadline = time.monotonic() + 40.0
    while len(got) < 2 * n and time.monotonic() < deadline and not errors:
        r = recv(http, me, since, block=True, max_=7, context="paging under load")
        calls += 1
        check(len(r["messages"]) <= 7, "max=7 returned %d" % len(r["messages"]))
        got.extend(r["messages"])
        since = advance(since, r)
    for t in threads:
        t.join(10.0)
    check(not errors, "; ".join(errors))
    # anything left behind would show up now
    r = recv(http, me, since, max_=1000, context="after the load")
    got.extend(r["messages"])
    texts = [m["msg"] for m in got]
    dups = len(texts) - len(set(texts))
    check(dups == 0, "%d messages received twice while paging under load" % dups)
    for frm in senders:
        mine = [t for t in texts if t.startswith(frm + " ")]
        want = ["%s %d" % (frm, i) for i in range(n)]
        if mine != want:
            missing = sorted(set(want) - set(mine), key=lambda t: int(t.split()[-1]))
            fail("paging under load: from %s got %d of %d (missing %r%s), in order: %s"
                 % (frm, len(mine), n, missing[:10], "..." if len(missing) > 10 else "",
                    mine == [w for w in want if w in mine]))
    seqs = [m["seq"] for m in got]
    check(seqs == sorted(seqs), "paging under load: seqs not increasing")
    log("paging under load: %d messages in %d polls, none skipped or repeated" % (len(got), calls))


def test_channels(http):
    me = unique_name("lp-chan")
    peer = unique_name("lp-csrc")
    chan = unique_name("lp-ch")
    recv(http, me, 0.0, context="initial default")
    recv(http, me, 0.0, channel=chan, context="initial channel")
    a = send_ab(http, peer, me, "on default")
    b = send_ab(http, peer, me, "on %s" % chan, channel=chan)
    check(b.get("channel") == chan, "POST /send with channel: reply channel %r" % b.get("channel"))
    plain = recv(http, me, 0.0, context="plain")
    check([(m["msg"], m["channel"]) for m in plain["messages"]] == [("on default", "default")],
          "plain /recv (default channel) returned %r" % plain["messages"])
    only = recv(http, me, 0.0, channel=chan, context="channel=%s" % chan)
    check([(m["msg"], m["channel"]) for m in only["messages"]] == [("on %s" % chan, chan)],
          "/recv channel=%s returned %r" % (chan, only["messages"]))
    star = recv(http, me, 0.0, channel="*", context="channel=*")
    check([(m["msg"], m["channel"], m["seq"]) for m in star["messages"]]
          == [("on default", "default", a["seq"]), ("on %s" % chan, chan, b["seq"])],
          "/recv channel=* returned %r, expected both messages oldest first"
          % star["messages"])
    # a blocked channel=* poll wakes for another channel
    since = advance(0.0, star)
    blocked = BlockedRecv(me, since, channel="*")
    time.sleep(1.0)
    check(not blocked.finished(), "block=true channel=* returned before the send: %r"
          % blocked.result)
    t_send = time.monotonic()
    c = send_ab(http, peer, me, "late on %s" % chan, channel=chan)
    if not blocked.wait(WAKE_LIMIT + 1.0):
        fail("block=true channel=* did not return %.1fs after a send on channel %s"
             % (time.monotonic() - t_send, chan))
    check(blocked.returned_at - t_send < WAKE_LIMIT,
          "block=true channel=* returned %.2fs after the send" % (blocked.returned_at - t_send))
    got = [(m["msg"], m["channel"], m["seq"]) for m in blocked.result["messages"]]
    check(got == [("late on %s" % chan, chan, c["seq"])],
          "block=true channel=* returned %r" % got)
    # and the plain poll still does not see it
    plain = recv(http, me, since, context="plain after")
    check(plain["messages"] == [], "plain /recv saw a message of another channel: %r" % plain)
    log("channels: default / %s / * as specified" % chan)


def test_since_ahead(http):
    me = unique_name("lp-ahead")
    peer = unique_name("lp-asrc")
    recv(http, me, 0.0, context="initial")
    ahead = time.time() + 3600.0
    blocked = BlockedRecv(me, ahead)
    time.sleep(0.5)
    sent = send_ab(http, peer, me, "older than since")
    time.sleep(1.5)
    check(not blocked.finished(),
          "block=true with since an hour ahead returned a message that is not newer: %r / %s"
          % (blocked.result, blocked.error))
    r = recv(http, me, ahead, context="since ahead, not blocking")
    check(r["messages"] == [], "since an hour ahead returned %r" % r["messages"])
    r = recv(http, me, 0.0, context="since 0 after")
    check([m["seq"] for m in r["messages"]] == [sent["seq"]],
          "since=0 returned %r, expected the one message" % r["messages"])
    log("since ahead of the bus clock: nothing older returned")


def main():
    t0 = time.monotonic()
    with httpbus.client() as http:
        test_nonblocking_empty(http)
        test_wakeup(http, "v1")
        test_wakeup(http, "agent-bus")
        test_paging(http)
        test_concurrent(http)
        test_channels(http)
        test_since_ahead(http)
        expect_json(http.get("/healthz"), 200, "GET /healthz at the end")
    log("long_poll done in %.1fs" % (time.monotonic() - t0))


if __name__ == "__main__":
    run(main)
