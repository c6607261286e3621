"""The per-agent send rate: 10,000 sends in one burst from one agent over
the Unix socket. The excess is refused with `rate_limited` (and the id of
the refused message); another agent sending meanwhile is not affected.

Env: HERMOD_SOCKET. The daemon runs with the default limits."""
import json
import threading

from common import RawConn, check, frame, log, run, unique_name

BURST = 10_000


def main():
    flood, calm, sink = unique_name("flood"), unique_name("calm"), unique_name("sink")
    c = RawConn(timeout=30)
    replies = []

    def read_all():
        for _ in range(BURST):
            replies.append(json.loads(c.recv_raw(timeout=30, what="a reply")))

    reader = threading.Thread(target=read_all)
    reader.start()
    frames = b"".join(
        frame(json.dumps(
            {"type": "send", "from": flood, "to": sink, "id": "f%d" % i, "body": {"n": i}}).encode())
        for i in range(BURST))
    c.send_bytes(frames)

    # Meanwhile another agent's sends all go through.
    other = RawConn(timeout=30)
    for i in range(200):
        other.send_obj({"type": "send", "from": calm, "to": sink, "body": {"n": i}})
        r = json.loads(other.recv_raw(timeout=30))
        check(r.get("type") == "sent", "calm's send %d: %r" % (i, r))
    reader.join(60)
    check(len(replies) == BURST, "got %d replies of %d" % (len(replies), BURST))
    sent = [r for r in replies if r.get("type") == "sent"]
    refused = [r for r in replies if r.get("type") == "error"]
    check(len(sent) + len(refused) == BURST, "unexpected replies: %r" % replies[:3])
    check(refused, "10,000 sends in a burst were all accepted")
    check(all(r["code"] == "rate_limited" for r in refused), "codes: %r" % {r["code"] for r in refused})
    check(all(r.get("id", "").startswith("f") for r in refused), "refusals carry the message id")
    check(len(sent) >= 5000, "the burst allowance (5,000) was not granted: %d" % len(sent))
    log("flood: %d sent, %d refused with rate_limited; calm: 200 of 200 sent" % (len(sent), len(refused)))


if __name__ == "__main__":
    run(main)
