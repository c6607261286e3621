"""Retention with gap signals (daemon started with --retention-messages 100).

Proves: 500 messages to one agent; once the background pruner has run,
every reader that starts from the beginning gets exactly the newest 100 and
is told that the rest is gone, each in its own protocol's way:

- v1 ``GET /v1/agents/{n}/inbox?after=0``: a ``gap`` object;
- v1 SSE ``/v1/agents/{n}/stream?after=0``: an ``event: gap`` first;
- agent-bus ``GET /recv?since=0``: an extra ``gap`` field;
- the Unix socket: a ``gap`` frame for a client that registered with
  ``gaps: true`` (one that did not gets only the messages);
- SSE-interop ``/subscribe`` (cursor at 0): an ``event: gap`` first.

A reader that resumes inside what is kept is told nothing.
"""
import json
import os
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import httpx  # noqa: E402
from httpx_sse import connect_sse  # noqa: E402

from common import RawConn, check, log, run, unique_name, wait_for  # noqa: E402
import httpbus  # noqa: E402

TOTAL = 500
KEEP = 100


def sse_events(http, path, params, count):
    """The first ``count`` events of an SSE stream as (event, id, data)."""
    out = []
    with connect_sse(http, "GET", path, params=params) as es:
        check(es.response.status_code == 200, "GET %s -> %d" % (path, es.response.status_code))
        for sse in es.iter_sse():
            if not sse.data:
                continue
            out.append((sse.event, sse.id, json.loads(sse.data)))
            if len(out) == count:
                return out
    return out


def main():
    agent = unique_name("keeper")
    http = httpx.Client(base_url=httpbus.base_url(), timeout=httpx.Timeout(20.0))
    seqs = []
    for n in range(TOTAL):
        r = http.post("/v1/messages", json={"from": "writer", "to": agent, "body": {"n": n}})
        check(r.status_code == 200, "send %d -> %d %s" % (n, r.status_code, r.text))
        seqs.append(r.json()["seq"])
    kept, pruned_through = seqs[-KEEP:], seqs[-KEEP - 1]

    # The pruner runs in the background (it may already have trimmed part
    # while the messages went in): wait until it caught up.
    def pruned_page():
        page = http.get("/v1/agents/%s/inbox" % agent,
                        params={"after": 0, "limit": 1000}).json()
        return page if page.get("gap", {}).get("pruned_through") == pruned_through else None

    page = wait_for(pruned_page, 20.0, "the pruner to trim the inbox to %d" % KEEP)
    check(page["gap"] == {"after": 0, "pruned_through": pruned_through},
          "v1 gap %r, want pruned_through %d" % (page["gap"], pruned_through))
    check([m["seq"] for m in page["messages"]] == kept, "v1 read: not the newest %d" % KEEP)
    log("v1 read: gap", page["gap"], "and the newest", len(page["messages"]))

    inside = http.get("/v1/agents/%s/inbox" % agent,
                      params={"after": kept[10], "limit": 1000}).json()
    check("gap" not in inside and len(inside["messages"]) == KEEP - 11,
          "a resume inside what is kept: %r" % {k: v for k, v in inside.items() if k != "messages"})

    recv = http.get("/recv", params={"to": agent, "since": 0, "max": 1000}).json()
    check(recv.get("gap", {}).get("pruned_through") == pruned_through, "/recv gap %r" % recv.get("gap"))
    check([m["seq"] for m in recv["messages"]] == kept, "/recv: not the newest %d" % KEEP)
    log("agent-bus /recv: gap", recv["gap"])

    stream = sse_events(http, "/v1/agents/%s/stream" % agent, {"after": 0}, 1 + KEEP)
    check(stream[0][0] == "gap" and stream[0][2]["pruned_through"] == pruned_through,
          "v1 stream starts with %r" % (stream[0],))
    check([int(e[1]) for e in stream[1:]] == kept and all(e[0] == "message" for e in stream[1:]),
          "v1 stream: not the newest %d after the gap" % KEEP)
    log("v1 SSE: event: gap, then", len(stream) - 1, "messages")

    for opted_in in (True, False):
        conn = RawConn()
        register = {"type": "register", "endpoint": agent, "ack": "explicit"}
        if opted_in:
            register["gaps"] = True
        conn.send_obj(register)
        check(conn.recv(what="registered")["type"] == "registered", "unix register")
        first = conn.recv(what="the first delivery")
        if opted_in:
            check(first == {"type": "gap", "after": 0, "pruned_through": pruned_through},
                  "unix (gaps: true) first frame %r" % first)
            first = conn.recv(what="the first message")
        check(first["type"] == "message" and first["seq"] == kept[0],
              "unix (gaps: %s) first message %r" % (opted_in, first))
        conn.sock.close()
    log("unix: a gap frame only for the client that asked")

    interop = sse_events(http, "/subscribe", {"agent": agent}, 1 + KEEP)
    check(interop[0][0] == "gap" and interop[0][2]["pruned_through"] == pruned_through,
          "/subscribe starts with %r" % (interop[0],))
    check([int(e[1]) for e in interop[1:]] == kept, "/subscribe: not the newest %d" % KEEP)
    log("interop SSE: event: gap, then", len(interop) - 1, "messages")


if __name__ == "__main__":
    run(main)
