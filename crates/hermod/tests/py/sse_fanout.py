"""1,000 concurrent SSE-interop subscribers on one daemon get one broadcast.

Proves:

1. 1,000 ``GET /subscribe?agent=fan-<run>-<i>`` streams (HTTP/1.1 over raw
   asyncio sockets, one connection each) are all accepted (200,
   ``text/event-stream``), each gets its keep-alive comments, and
   ``/status`` lists every one of them with ``subscribers[name] == true``.
2. While the 1,000 streams are open (and while the bus fans out the
   ``subscriber_connected`` notices each connect causes), ``GET /health``
   and ``GET /status`` each answer within 2 s.
3. One ``POST /broadcast?from=<announcer>`` (the announcer made itself known
   with one ``/poll``) reports at least 1,000 recipients, and every one of
   the 1,000 streams receives it exactly once: its fields, ``_meta.from`` =
   the announcer, ``_meta.to`` = null, ``_meta.id``/``seq`` = the broadcast's
   receipt, SSE ``id:`` = seq.  ``subscriber_connected`` notices are
   ignored.  No stream ends or goes silent.

Prints the time from the broadcast to the last delivery.  ``FANOUT_N``
overrides the number of subscribers (for development).
"""
import asyncio
import json
import os
import sys
import threading
import time
import urllib.parse
import uuid

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import check, fail, is_int, log, run  # noqa: E402
import httpbus  # noqa: E402
from httpbus import expect_json  # noqa: E402

N = int(os.environ.get("FANOUT_N", "1000"))
CONNECT_PARALLEL = 50
CONNECT_TIMEOUT = 60.0
KEEPALIVE_TIMEOUT = 30.0
DELIVERY_TIMEOUT = 30.0
SILENCE_LIMIT = 10.0  # keep-alives come every second
SETTLE = 1.5
ADMIN_LIMIT = 2.0


class Sub:
    """One raw HTTP/1.1 SSE stream."""

    def __init__(self, i, agent):
        self.i = i
        self.agent = agent
        self.reader = None
        self.writer = None
        self.chunked = False
        self.raw = b""
        self.state = "size"
        self.left = 0
        self.body = b""
        self.keepalives = 0
        self.notices = 0
        self.others = []  # (sse id, parsed data) of every non-notice event
        self.last_activity = time.monotonic()
        self.ended = None
        self.task = None
        self.got_target_at = None
        self.target_token = None

    async def connect(self, host, port):
        self.reader, self.writer = await asyncio.open_connection(host, port)
        path = "/subscribe?" + urllib.parse.urlencode({"agent": self.agent})
        self.writer.write(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n"
                           "Cache-Control: no-store\r\n\r\n" % (path, host, port)).encode())
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0]
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if " 200 " not in status + " ":
            rest = b""
            try:
                rest = await asyncio.wait_for(self.reader.read(2000), 2.0)
            except asyncio.TimeoutError:
                pass
            fail("subscriber %s: %s %r" % (self.agent, status, rest[:300]))
        ctype = headers.get("content-type", "")
        check("text/event-stream" in ctype,
              "subscriber %s: content-type %r" % (self.agent, ctype))
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.last_activity = time.monotonic()

    async def pump(self):
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    self.ended = "the daemon closed the stream"
                    return
                self.last_activity = time.monotonic()
                self.feed(data)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported by main
            self.ended = "%s: %s" % (type(e).__name__, e)

    def feed(self, data):
        if not self.chunked:
            self.events(data)
            return
        self.raw += data
        out = []
        while True:
            if self.state == "size":
                k = self.raw.find(b"\r\n")
                if k < 0:
                    break
                size = int(self.raw[:k].split(b";")[0], 16)
                self.raw = self.raw[k + 2:]
                if size == 0:
                    self.ended = "the daemon ended the chunked stream"
                    break
                self.state, self.left = "data", size
            elif self.state == "data":
                if not self.raw:
                    break
                take = self.raw[:self.left]
                self.raw = self.raw[len(take):]
                out.append(take)
                self.left -= len(take)
                if self.left:
                    break
                self.state = "crlf"
            else:
                if len(self.raw) < 2:
                    break
                self.raw = self.raw[2:]
                self.state = "size"
        if out:
            self.events(b"".join(out))

    def events(self, data):
        self.body += data
        if b"\n\n" not in self.body:
            return
        *complete, self.body = self.body.split(b"\n\n")
        for ev in complete:
            if ev.startswith(b":"):
                self.keepalives += 1
                continue
            if b"subscriber_connected" in ev:
                self.notices += 1
                continue
            ev_id = None
            data_lines = []
            for line in ev.split(b"\n"):
                if line.startswith(b":"):
                    self.keepalives += 1
                elif line.startswith(b"id:"):
                    ev_id = line[3:].strip().decode()
                elif line.startswith(b"data:"):
                    data_lines.append(line[6:] if line[5:6] == b" " else line[5:])
            if not data_lines:
                continue
            try:
                obj = json.loads(b"\n".join(data_lines).decode("utf-8"))
            except ValueError:
                self.ended = "event data is not JSON: %r" % ev[:200]
                continue
            self.others.append((ev_id, obj))
            if (self.target_token is not None and isinstance(obj, dict)
                    and obj.get("token") == self.target_token and self.got_target_at is None):
                self.got_target_at = time.monotonic()

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass


def admin_checks(label, results):
    """/health and /status each within ADMIN_LIMIT (run in a thread)."""
    try:
        with httpbus.client(timeout=10.0) as http:
            for path in ("/health", "/status"):
                t0 = time.monotonic()
                body = expect_json(http.get(path), 200, "GET %s (%s)" % (path, label))
                took = time.monotonic() - t0
                results.append((label, path, took, body))
    except Exception as e:  # noqa: BLE001
        results.append((label, "error", 0.0, "%s: %s" % (type(e).__name__, e)))


def check_admin(results):
    for label, path, took, body in results:
        check(path != "error", "admin check (%s) failed: %s" % (label, body))
        check(took < ADMIN_LIMIT, "GET %s (%s) took %.2fs with %d streams open (limit %.0fs)"
              % (path, label, took, N, ADMIN_LIMIT))
        if path == "/health":
            check(body.get("ok") is True, "GET /health (%s): %r" % (label, body))


def status_subscribers(http):
    body = expect_json(http.get("/status"), 200, "GET /status")
    check(isinstance(body.get("subscribers"), dict), "GET /status: no subscribers map: %r"
          % str(body)[:300])
    return body


async def amain():
    url = urllib.parse.urlsplit(httpbus.base_url())
    host, port = url.hostname, url.port
    run_id = uuid.uuid4().hex[:8]
    subs = [Sub(i, "fan-%s-%d" % (run_id, i)) for i in range(N)]
    sem = asyncio.Semaphore(CONNECT_PARALLEL)

    async def open_one(s):
        async with sem:
            await s.connect(host, port)
        s.task = asyncio.ensure_future(s.pump())

    try:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.gather(*(open_one(s) for s in subs)), CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            done = sum(1 for s in subs if s.task is not None)
            fail("only %d of %d /subscribe streams opened within %.0fs" % (done, N, CONNECT_TIMEOUT))
        log("%d streams open in %.1fs" % (N, time.monotonic() - t0))

        def dead():
            return [s for s in subs if s.ended is not None]

        def silent():
            now = time.monotonic()
            return [s for s in subs if now - s.last_activity > SILENCE_LIMIT]

        def assert_healthy(when):
            d = dead()
            check(not d, "%d streams ended %s, e.g. %s: %s" % (len(d), when, d[0].agent, d[0].ended)
                  if d else "")
            q = silent()
            check(not q, "%d streams silent for > %.0fs %s (no keep-alive), e.g. %s"
                  % (len(q), SILENCE_LIMIT, when, q[0].agent) if q else "")

        # every stream got a keep-alive
        deadline = time.monotonic() + KEEPALIVE_TIMEOUT
        while True:
            assert_healthy("while waiting for keep-alives")
            missing = [s for s in subs if s.keepalives == 0]
            if not missing:
                break
            if time.monotonic() > deadline:
                fail("%d of %d streams got no keep-alive within %.0fs, e.g. %s"
                     % (len(missing), N, KEEPALIVE_TIMEOUT, missing[0].agent))
            await asyncio.sleep(0.1)
        log("every stream got a keep-alive %.1fs after the first connect" % (time.monotonic() - t0))

        # /health and /status while all streams are open
        admin = []
        await asyncio.to_thread(admin_checks, "all streams open", admin)
        check_admin(admin)
        status = [r for r in admin if r[1] == "/status"][0][3]
        subscribers = status.get("subscribers")
        check(isinstance(subscribers, dict), "GET /status: no subscribers map")
        not_sub = [s.agent for s in subs if subscribers.get(s.agent) is not True]
        check(not not_sub, "/status does not show %d of %d open streams as subscribers, e.g. %r -> %r"
              % (len(not_sub), N, not_sub[:3], [subscribers.get(a) for a in not_sub[:3]]))
        agents = status.get("agents", {})
        offline = [s.agent for s in subs if not (agents.get(s.agent) or {}).get("online")]
        check(not offline, "/status shows %d subscribed agents offline, e.g. %r"
              % (len(offline), offline[:3]))
        log("/health %.3fs, /status %.3fs with %d streams; all %d listed as subscribers"
            % (admin[0][2], admin[1][2], N, N))

        # the announcer makes itself known, then broadcasts
        announcer = "announcer-%s" % run_id
        token = uuid.uuid4().hex
        for s in subs:
            s.target_token = token
        body = {"text": "fan-out 📣 to all", "token": token, "n": [1, 2, 3]}

        def do_broadcast():
            with httpbus.client(timeout=30.0) as http:
                expect_json(http.get("/poll", params={"agent": announcer}), 200,
                            "GET /poll?agent=announcer")
                t = time.monotonic()
                r = expect_json(http.post("/broadcast", params={"from": announcer}, json=body),
                                200, "POST /broadcast?from=announcer")
                return t, time.monotonic(), r

        t_bcast, t_reply, receipt = await asyncio.to_thread(do_broadcast)
        check(receipt.get("delivered") is True and is_int(receipt.get("recipients"))
              and is_int(receipt.get("seq")) and isinstance(receipt.get("id"), str),
              "POST /broadcast: reply %r" % receipt)
        check(receipt["recipients"] >= N, "POST /broadcast reports %r recipients with %d subscribers"
              % (receipt["recipients"], N))
        log("broadcast durable in %.3fs, %d recipients" % (t_reply - t_bcast, receipt["recipients"]))

        admin2 = []
        admin_thread = threading.Thread(target=admin_checks, args=("during the fan-out", admin2),
                                        daemon=True)
        admin_thread.start()

        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while True:
            assert_healthy("during the fan-out")
            waiting = [s for s in subs if s.got_target_at is None]
            if not waiting:
                break
            if time.monotonic() > deadline:
                fail("%d of %d subscribers did not get the broadcast within %.0fs, e.g. %s"
                     % (len(waiting), N, DELIVERY_TIMEOUT, waiting[0].agent))
            await asyncio.sleep(0.02)
        last = max(s.got_target_at for s in subs)
        first = min(s.got_target_at for s in subs)
        log("broadcast -> first delivery %.3fs, -> last delivery %.3fs (%d subscribers)"
            % (first - t_bcast, last - t_bcast, N))
        await asyncio.sleep(SETTLE)
        assert_healthy("after the fan-out")
        await asyncio.to_thread(admin_thread.join, 15.0)
        check(admin2, "admin checks during the fan-out did not finish")
        check_admin(admin2)

        for s in subs:
            mine = [(i, o) for i, o in s.others
                    if isinstance(o, dict) and o.get("token") == token]
            check(len(mine) == 1, "%s got the broadcast %d times" % (s.agent, len(mine)))
            ev_id, obj = mine[0]
            meta = obj.get("_meta") or {}
            fields = {k: v for k, v in obj.items() if k != "_meta"}
            check(fields == body, "%s: broadcast fields %r, expected %r" % (s.agent, fields, body))
            check(meta.get("from") == announcer and meta.get("to") is None
                  and meta.get("id") == receipt["id"] and meta.get("seq") == receipt["seq"]
                  and meta.get("channel") == "default",
                  "%s: _meta %r, expected from=%r to=null id=%r seq=%r channel=default"
                  % (s.agent, meta, announcer, receipt["id"], receipt["seq"]))
            check(ev_id == str(receipt["seq"]), "%s: SSE id %r != seq %r" % (s.agent, ev_id, receipt["seq"]))
            unexpected = [o for i, o in s.others if not (isinstance(o, dict) and o.get("token") == token)]
            check(not unexpected, "%s got unexpected events: %r" % (s.agent, unexpected[:3]))
        notices = sum(s.notices for s in subs)
        log("every one of %d subscribers got it exactly once (%d subscriber_connected notices "
            "ignored)" % (N, notices))
        log("BROADCAST-TO-LAST-DELIVERY %.3fs" % (last - t_bcast))
    finally:
        for s in subs:
            if s.task is not None:
                s.task.cancel()
            s.close()
        tasks = [s.task for s in subs if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)


def main():
    t0 = time.monotonic()
    asyncio.run(amain())
    with httpbus.client() as http:
        expect_json(http.get("/health"), 200, "GET /health after closing the streams")
    log("sse_fanout done in %.1fs" % (time.monotonic() - t0))


if __name__ == "__main__":
    run(main)
