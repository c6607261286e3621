"""SSE resume with Last-Event-ID, the shared /poll + /subscribe cursor, and
isolation of streams.

Proves:

(a) For the v1 stream (``/v1/agents/{n}/stream``) and the interop stream
    (``/subscribe``): read 5 events (SSE ``id:`` = seq), disconnect, send 4
    more while disconnected, reconnect with ``Last-Event-ID`` = the last id
    read -> exactly those 4, in order, nothing repeated, and the stream goes
    on live (a 5th arrives).  Then disconnect having processed only up to the
    2nd of them, send one more, reconnect with that id -> exactly the rest
    (3 already-streamed but unprocessed + 1 new), in order.
(b) ``/poll`` and ``/subscribe`` on one agent share one cursor: with a stream
    open, 200 messages are sent with a ``/poll`` after every 5-15 sends and a
    second client polling in a tight loop; for messages 60-139 (128 KiB each)
    the stream client stops reading, so the polls must get messages the
    stream cannot deliver.  Once the stream and the polls together account
    for all 200 the stream is closed and a final ``/poll`` returns nothing
    more.  Every message went out exactly once (never through both, never
    through neither).
(c) Streams are independent: while 150 messages flow, a ``/subscribe``
    client that closes normally and another that resets its TCP connection
    mid-stream end only their own streams; a third agent's ``/subscribe``
    and a v1 stream of the first agent receive all their messages, in order,
    exactly once, and the daemon keeps answering ``/health``.
"""
import os
import random
import socket
import struct
import sys
import threading
import time
import urllib.parse

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import check, fail, is_int, log, run, unique_name  # noqa: E402
import httpbus  # noqa: E402
from httpbus import expect_json, interop_stream, norm_interop, stop_all, v1_stream  # noqa: E402

SETTLE = 1.0


def send_v1(http, frm, to, body):
    r = expect_json(http.post("/v1/messages", json={"from": frm, "to": to, "body": body}), 200,
                    "POST /v1/messages %s -> %s" % (frm, to))
    check(is_int(r.get("seq")) and isinstance(r.get("id"), str), "POST /v1/messages: reply %r" % r)
    return r


def from_sender(sender):
    return lambda rec: rec["from"] == sender


def expect_stream(reader, sender, want_seqs, what):
    """The reader gets exactly ``want_seqs`` from ``sender`` (after a settle)."""
    reader.wait_for(from_sender(sender), len(want_seqs), 10.0, what)
    time.sleep(SETTLE)
    reader.check_alive()
    recs = [r for r in reader.snapshot() if r["from"] == sender]
    got = [r["seq"] for r in recs]
    check(got == want_seqs, "%s: got seqs %r, expected exactly %r" % (what, got, want_seqs))
    for r in recs:
        check(r.get("event_id") == str(r["seq"]),
              "%s: SSE id %r is not the seq %r" % (what, r.get("event_id"), r["seq"]))
    return recs


def test_resume(http, kind):
    me = unique_name("rs-%s" % kind)
    sender = unique_name("rs-src")

    def open_stream(last=None):
        if kind == "v1":
            return v1_stream(me, "v1 stream of %s" % me, last_event_id=last).start()
        return interop_stream(me, "subscribe of %s" % me, last_event_id=last).start()

    def send(i):
        return send_v1(http, sender, me, {"text": "resume %s %d 🔁" % (kind, i), "i": i})["seq"]

    s1 = open_stream()
    readers = [s1]
    try:
        s1.wait_ready()
        seqs = [send(i) for i in range(5)]
        recs = expect_stream(s1, sender, seqs, "%s: first 5 events" % kind)
        check([r["body"]["i"] for r in recs] == list(range(5)), "%s: bodies out of order" % kind)
        last = recs[-1]["event_id"]
        s1.stop()

        gap = [send(i) for i in range(5, 9)]
        s2 = open_stream(last)
        readers.append(s2)
        s2.wait_ready()
        recs = expect_stream(s2, sender, gap, "%s: reconnect with Last-Event-ID %s (the gap)"
                             % (kind, last))
        check([r["body"]["i"] for r in recs] == [5, 6, 7, 8], "%s: gap bodies %r"
              % (kind, [r["body"] for r in recs]))
        live = send(9)
        recs = expect_stream(s2, sender, gap + [live], "%s: live event after the resume" % kind)
        processed = recs[1]["event_id"]  # pretend only 5 and 6 were handled
        s2.stop()

        late = send(10)
        s3 = open_stream(processed)
        readers.append(s3)
        s3.wait_ready()
        want = gap[2:] + [live, late]
        recs = expect_stream(s3, sender, want, "%s: reconnect with Last-Event-ID %s (mid-batch)"
                             % (kind, processed))
        check([r["body"]["i"] for r in recs] == [7, 8, 9, 10], "%s: resumed bodies %r"
              % (kind, [r["body"] for r in recs]))
        s3.stop()
    finally:
        stop_all(readers)
    log("%s: Last-Event-ID resume delivers exactly the gap" % kind)


def poll(http, agent):
    items = expect_json(http.get("/poll", params={"agent": agent}), 200, "GET /poll?agent=%s" % agent)
    check(isinstance(items, list), "GET /poll: not a JSON list: %r" % items)
    return [norm_interop(i, "poll") for i in items]


def test_poll_and_subscribe(http):
    me = unique_name("rs-shared")
    sender = unique_name("rs-psrc")
    n = 200
    rng = random.Random(7)
    # a small receive buffer and big bodies: the held stream's socket
    # buffers fill after a few messages
    pad = "p" * 131072
    stream = interop_stream(me, "subscribe of %s" % me,
                            socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]).start()
    polled = []
    polls = [0]
    lock = threading.Lock()
    racing = threading.Event()
    stop_racer = threading.Event()
    errors = []

    def do_poll(c):
        got = [r for r in poll(c, me) if r["from"] == sender]
        with lock:
            polled.extend(got)
            polls[0] += 1

    def racer():
        # a second poller racing the stream and the main thread's polls
        try:
            with httpbus.client() as c:
                while not stop_racer.is_set():
                    if racing.is_set():
                        do_poll(c)
                    time.sleep(0.003)
        except Exception as e:  # noqa: BLE001
            errors.append("racing poller: %s: %s" % (type(e).__name__, e))

    racer_thread = threading.Thread(target=racer, daemon=True)
    racer_thread.start()
    phases = []
    try:
        stream.wait_ready()
        sent = []
        next_poll = rng.randint(5, 15)
        for i in range(n):
            if i == 0:
                racing.set()
            if i == 60:  # the stream client stops reading for a while
                racing.clear()
                stream.hold.set()
            if i == 140:
                stream.hold.clear()
                racing.set()
            body = {"text": "shared %d" % i, "i": i}
            if 60 <= i < 140:
                body["pad"] = pad
            sent.append(send_v1(http, sender, me, body)["seq"])
            if i + 1 >= next_poll:
                do_poll(http)
                next_poll = i + 1 + rng.randint(5, 15)
            if i in (59, 139, 199):
                with lock:
                    phases.append((len(polled), len([r for r in stream.snapshot()
                                                     if r["from"] == sender])))
        stop_racer.set()
        racer_thread.join(10.0)
        check(not errors, "; ".join(errors))

        def accounted():
            streamed = [r for r in stream.snapshot() if r["from"] == sender]
            return len(streamed) + len(polled) >= n

        deadline = time.monotonic() + 15.0
        while not accounted() and time.monotonic() < deadline:
            stream.check_alive()
            time.sleep(0.05)
        time.sleep(0.3)
        stream.check_alive()
    finally:
        stop_racer.set()
        stream.stop()
    streamed = [r for r in stream.snapshot() if r["from"] == sender]
    final = [r for r in poll(http, me) if r["from"] == sender]
    polled_all = polled + final
    s_seqs = [r["seq"] for r in streamed]
    p_seqs = [r["seq"] for r in polled_all]
    both = sorted(set(s_seqs) & set(p_seqs))
    check(not both, "%d messages went out through BOTH /subscribe and /poll, e.g. seqs %r"
          % (len(both), both[:10]))
    dup_s = len(s_seqs) - len(set(s_seqs))
    dup_p = len(p_seqs) - len(set(p_seqs))
    check(dup_s == 0 and dup_p == 0, "repeats: %d within the stream, %d within polls" % (dup_s, dup_p))
    union = set(s_seqs) | set(p_seqs)
    missing = [s for s in sent if s not in union]
    check(not missing, "%d of %d messages went out through NEITHER /subscribe nor /poll "
          "(stream %d, polls %d, final poll %d), e.g. seqs %r"
          % (len(missing), n, len(s_seqs), len(polled), len(final), missing[:10]))
    check(s_seqs == sorted(s_seqs), "stream events out of order")
    check(final == [], "final /poll after the stream accounted for everything returned %d: %r"
          % (len(final), [r["seq"] for r in final]))
    check(p_seqs, "no message went out through /poll although the stream was not read for "
          "80 messages: the stream claims what it cannot deliver")
    log("poll+subscribe: %d via the stream, %d via %d polls (polled/streamed after each phase: %r), "
        "none twice, none lost" % (len(s_seqs), len(p_seqs), polls[0] + 1, phases))


class RawSubscriber:
    """A bare-socket ``/subscribe`` that can be reset mid-stream."""

    def __init__(self, agent):
        url = urllib.parse.urlsplit(httpbus.base_url())
        self.sock = socket.create_connection((url.hostname, url.port), timeout=5)
        req = ("GET /subscribe?agent=%s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n"
               % (agent, url.netloc))
        self.sock.sendall(req.encode())
        self.buf = b""

    def wait_headers(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                fail("raw /subscribe: no response headers within %.0fs" % timeout)
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                fail("raw /subscribe: connection closed before the headers: %r" % self.buf)
            self.buf += chunk
        head = self.buf.split(b"\r\n", 1)[0]
        check(b" 200 " in head + b" ", "raw /subscribe: %r" % self.buf[:300])

    def read_until(self, count, timeout):
        """Read until ``count`` ``id:`` lines were seen (or the deadline)."""
        deadline = time.monotonic() + timeout
        while self.buf.count(b"\nid: ") < count and time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            self.buf += chunk
        return self.buf.count(b"\nid: ")

    def reset(self):
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def test_isolation(http):
    x = unique_name("rs-x")
    y = unique_name("rs-y")
    z = unique_name("rs-z")
    sender = unique_name("rs-isrc")
    n = 150
    graceful = interop_stream(x, "subscribe of %s (closes)" % x).start()
    keeper = interop_stream(y, "subscribe of %s (keeps reading)" % y).start()
    v1x = v1_stream(x, "v1 stream of %s" % x, after=0).start()
    readers = [graceful, keeper, v1x]
    try:
        for r in readers:
            r.wait_ready()
        rst = RawSubscriber(z)
        rst.wait_headers(10.0)
        sent = {x: [], y: [], z: []}
        closed_graceful = False
        closed_rst = False
        for i in range(n):
            for agent in (x, y, z):
                sent[agent].append(send_v1(http, sender, agent, {"text": "iso %d" % i, "i": i})["seq"])
            if i == 30:
                graceful.wait_for(from_sender(sender), 10, 10.0, "first events of the closing stream")
                graceful.stop()
                closed_graceful = True
            if i == 50:
                got = rst.read_until(10, 10.0)
                check(got >= 10, "the raw subscriber of %s got only %d events" % (z, got))
                rst.reset()
                closed_rst = True
            if i % 25 == 0:
                t0 = time.monotonic()
                expect_json(http.get("/health"), 200, "GET /health mid-stream")
                check(time.monotonic() - t0 < 2.0, "/health took %.1fs" % (time.monotonic() - t0))
        check(closed_graceful and closed_rst, "unreachable")
        recs = expect_stream(keeper, sender, sent[y], "the subscriber that kept reading")
        check([r["body"]["i"] for r in recs] == list(range(n)), "keeper bodies out of order")
        expect_stream(v1x, sender, sent[x], "the v1 stream of the agent whose /subscribe closed")
        # what the closed streams did not take is still there for /poll
        left_x = [r["seq"] for r in poll(http, x) if r["from"] == sender]
        streamed_x = [r["seq"] for r in graceful.snapshot() if r["from"] == sender]
        check(not set(left_x) & set(streamed_x), "/poll of %s repeats streamed messages" % x)
        check(left_x, "after its /subscribe closed at message 30 of %d, /poll of %s returned "
              "nothing (everything was claimed by a closed stream)" % (n, x))
        check(left_x == sent[x][-len(left_x):],
              "/poll of %s after the stream closed is not the tail of what was sent" % x)
    finally:
        stop_all(readers)
    expect_json(http.get("/health"), 200, "GET /health after the disconnects")
    log("isolation: a closed and a reset /subscribe ended only themselves; %d/%d delivered to "
        "the others" % (n, n))


def main():
    t0 = time.monotonic()
    with httpbus.client() as http:
        test_resume(http, "v1")
        test_resume(http, "interop")
        test_poll_and_subscribe(http)
        test_isolation(http)
    log("sse_resume done in %.1fs" % (time.monotonic() - t0))


if __name__ == "__main__":
    run(main)
