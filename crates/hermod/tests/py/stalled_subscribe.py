"""A /subscribe reader that stops reading loses nothing (daemon started
with --http-write-timeout 2 --send-rate 0).

Proves: a reader opens the SSE-interop stream, reads one message, then
stops reading while 100,000 messages flow in.  The daemon's writes block,
and after the write timeout it closes the stalled stream (the reader,
draining what its socket still holds, sees the stream end well before
all messages came).  The reader reconnects *without* Last-Event-ID and
gets the rest: together the two streams hold every message.  Claims the
daemon could not confirm were released, so at most one batch arrives
twice.
"""
import os
import sys
import time

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import httpx  # noqa: E402

from common import check, log, run, unique_name  # noqa: E402
import httpbus  # noqa: E402

TOTAL = 100_000
BATCH = 1000
WRITE_TIMEOUT = 2.0
PAD = "x" * 150


def ids_from(lines, into, stop_at=None, deadline=None):
    """Collects SSE ids until the stream ends (or ``stop_at`` ids, or the
    deadline); returns how it ended."""
    try:
        for line in lines:
            if line.startswith("id:"):
                into.append(int(line[3:].strip()))
                if stop_at is not None and len(into) >= stop_at:
                    return "enough"
            if deadline is not None and time.monotonic() > deadline:
                return "deadline"
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return "closed"
    return "ended"


def main():
    agent = unique_name("staller")
    base = httpbus.base_url()
    timeout = httpx.Timeout(30.0, read=30.0)
    sender = httpx.Client(base_url=base, timeout=timeout)

    def send(first, count):
        body = [{"from": "flood", "to": agent, "body": {"n": n, "pad": PAD}}
                for n in range(first, first + count)]
        r = sender.post("/v1/messages", json=body)
        check(r.status_code == 200, "batch send -> %d %s" % (r.status_code, r.text[:200]))
        out = r.json()
        check(all("seq" in o for o in out), "batch send refused: %r" % [o for o in out if "seq" not in o][:1])
        return [o["seq"] for o in out]

    reader = httpx.Client(base_url=base, timeout=timeout)
    first = []
    with reader.stream("GET", "/subscribe", params={"agent": agent}) as resp:
        check(resp.status_code == 200, "/subscribe -> %d" % resp.status_code)
        lines = resp.iter_lines()
        sent = send(0, 1)
        t0 = time.monotonic()
        check(ids_from(lines, first, stop_at=1) == "enough", "the live stream delivered nothing")
        # Stop reading; the flood goes in meanwhile.
        for start in range(1, TOTAL, BATCH):
            sent += send(start, min(BATCH, TOTAL + 1 - start))
        log("sent", len(sent), "messages while the reader did not read (%.1f s)" % (time.monotonic() - t0))
        time.sleep(WRITE_TIMEOUT + 3.0)
        # Drain what the socket still holds: the daemon must have closed.
        how = ids_from(lines, first, deadline=time.monotonic() + 30.0)
    check(how in ("closed", "ended"), "the stalled stream was not closed (%s)" % how)
    check(len(first) < len(sent), "the stalled stream delivered everything (%d)" % len(first))
    log("stalled stream closed after", len(first), "messages (%.1f s)" % (time.monotonic() - t0))

    second = []
    with reader.stream("GET", "/subscribe", params={"agent": agent}) as resp:
        check(resp.status_code == 200, "/subscribe again -> %d" % resp.status_code)
        missing = set(sent) - set(first)
        deadline = time.monotonic() + 60.0
        try:
            for line in resp.iter_lines():
                if line.startswith("id:"):
                    seq = int(line[3:].strip())
                    second.append(seq)
                    missing.discard(seq)
                    if not missing:
                        break
                check(time.monotonic() < deadline, "the reconnected stream stalled")
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            log("the reconnected stream ended:", e)
    check(not missing, "%d messages lost, e.g. %s" % (len(missing), sorted(missing)[:5]))
    twice = len(first) + len(second) - len(set(first) | set(second))
    check(twice <= 256, "%d messages came twice (at most one batch may)" % twice)
    log("reconnected without Last-Event-ID: got the other", len(set(second) - set(first)),
        "messages;", twice, "twice (%.1f s)" % (time.monotonic() - t0))


if __name__ == "__main__":
    run(main)
