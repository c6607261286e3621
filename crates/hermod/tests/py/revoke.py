"""Revoking or rotating an agent's identity ends every open session of its
old token within a second, whatever the door: a registered Unix
connection, the v1 WebSocket, the v1 SSE inbox stream, the interop
`/subscribe` stream, the `/v1/events` topic stream, the relay's
`/api/events`, live `subscribe` frames, a receipt wait, and a pending
`/v1/agents/{name}/inbox?wait=` long-poll.
Nothing the agent sends after the change is stored.

Env: HERMOD_BIN, HERMOD_SOCKET, HERMOD_URL."""
import json
import threading
import time

import httpx
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed

from common import RawConn, check, log, run, unique_name
from httpbus import base_url, client, expect_json, ws_url
from trust import cli

# Revocation is applied before the CLI answers; a second covers the
# scheduling of every stream's task.
WITHIN = 1.0


class Ended:
    """Runs `body` in a thread and records when it returned (the stream or
    long-poll it reads ended), and how."""

    def __init__(self, what, body):
        self.what, self.at, self.how = what, None, None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(body,), daemon=True)
        self.thread.start()

    def _run(self, body):
        try:
            self.how = body(self.ready)
        except Exception as e:  # the end of a stream is what we wait for
            self.how = "%s: %s" % (type(e).__name__, e)
        self.at = time.monotonic()
        self.ready.set()

    def wait_ready(self):
        check(self.ready.wait(10), "%s never opened" % self.what)
        check(self.at is None, "%s ended before the change: %s" % (self.what, self.how))


def sse_until_end(path, token):
    def body(ready):
        headers = {"Authorization": "Bearer " + token}
        with httpx.Client(base_url=base_url(), timeout=httpx.Timeout(10, read=30)) as c:
            with c.stream("GET", path, headers=headers) as resp:
                check(resp.status_code == 200, "GET %s -> %d" % (path, resp.status_code))
                ready.set()
                for _ in resp.iter_raw():
                    pass
        return "stream ended"
    return body


def long_poll(path, token):
    def body(ready):
        headers = {"Authorization": "Bearer " + token}
        with httpx.Client(base_url=base_url(), timeout=40) as c:
            # Opened, as far as a client can tell, once the request is sent.
            threading.Timer(0.3, ready.set).start()
            resp = c.get(path, headers=headers)
        return "status %d %s" % (resp.status_code, resp.text[:200])
    return body


def unix_registered(name, token):
    def body(ready):
        c = RawConn()
        c.send_obj({"type": "register", "endpoint": name, "token": token})
        reply = json.loads(c.recv_raw(what="registered"))
        check(reply.get("type") == "registered", "register: %r" % reply)
        ready.set()
        return "closed" if c.wait_closed(timeout=30) else "still open after 30 s"
    return body


def relay_listener(token):
    def body(ready):
        url = ws_url("/api/events?channel=gateway")
        with ws_client.connect(url, additional_headers={"Authorization": "Bearer " + token},
                               open_timeout=10) as ws:
            ready.set()
            try:
                while True:
                    ws.recv(timeout=30)
            except ConnectionClosed:
                return "closed"
    return body


def publish(topic):
    with client() as c:
        expect_json(c.post("/v1/events", json={"topic": topic, "durable": True}), 200,
                    "publish %s" % topic)


def inbox_of(name):
    with client() as c:
        page = expect_json(c.get("/v1/agents/%s/inbox" % name, params={"limit": 1000}), 200,
                           "owner reads %s" % name)
    return page["messages"]


def one_change(change):
    """Opens every kind of session for a fresh agent, applies `change`
    (`revoke` or `rotate`) and checks each ended in time."""
    name, peer = unique_name("rv"), unique_name("peer")
    token = json.loads(cli("agent", "add", "--json", name).stdout)["token"]
    auth = {"Authorization": "Bearer " + token}
    with client() as c:
        before = expect_json(
            c.post("/v1/messages", json={"from": name, "to": peer, "body": {"n": "before"}},
                   headers=auth), 200, "send before the change")
    with ws_client.connect(ws_url("/v1/agents/%s/ws" % name), additional_headers=auth,
                           open_timeout=10) as ws:
        checked_change(change, name, peer, token, auth, ws, before["id"])


def checked_change(change, name, peer, token, auth, ws, sent_id):
    sessions = [
        Ended("unix register", unix_registered(name, token)),
        Ended("v1 SSE stream", sse_until_end("/v1/agents/%s/stream" % name, token)),
        Ended("interop /subscribe", sse_until_end("/subscribe?agent=%s&channel=other" % name, token)),
        Ended("/v1/events", sse_until_end("/v1/events?pattern=**", token)),
        Ended("relay /api/events", relay_listener(token)),
        Ended("inbox long-poll", long_poll("/v1/agents/%s/inbox?wait=25&channel=third" % name, token)),
    ]
    for s in sessions:
        s.wait_ready()
    # A live `subscribe` stream and a receipt wait on an owner's connection,
    # each opened with the agent's token in its frame.
    live = RawConn()
    live.send_obj({"type": "subscribe", "pattern": "rv.**", "token": token})
    check(json.loads(live.recv_raw(what="subscribed")).get("type") == "subscribed", "subscribe")
    publish("rv.before")
    got = json.loads(live.recv_raw(what="an event before the change"))
    check(got.get("topic") == "rv.before", "the live stream works: %r" % got)
    receipt = RawConn()
    # Nobody reads what it sent: the wait would hold for 25 s.
    receipt.send_obj({"type": "receipt", "id": sent_id, "wait": "read", "timeout": 25,
                      "token": token})
    # The WebSocket works before the change.
    ws.send(json.dumps({"type": "send", "to": peer, "body": {"n": "ws-before"}}))
    check(json.loads(ws.recv(timeout=10)).get("type") == "sent", "a WebSocket send works")

    cli("agent", change, "--json", name)
    changed = time.monotonic()
    # A frame in flight after the change is refused, never stored.
    try:
        ws.send(json.dumps({"type": "send", "to": peer, "body": {"n": "ws-after"}}))
        while True:
            frame = json.loads(ws.recv(timeout=WITHIN + 1))
            check(frame.get("type") != "sent", "a WebSocket send after %s was accepted" % change)
            if frame.get("type") == "error":
                check(frame.get("code") == "unauthorized", "ws after %s: %r" % (change, frame))
    except ConnectionClosed:
        pass
    ws_end = time.monotonic() - changed
    check(ws_end < WITHIN, "the WebSocket stayed open %.2f s after %s" % (ws_end, change))
    for s in sessions:
        s.thread.join(WITHIN + 1)
        check(s.at is not None, "%s still open %.1f s after %s" % (s.what, WITHIN + 1, change))
        took = s.at - changed
        check(took < WITHIN, "%s ended %.2f s after %s (%s)" % (s.what, took, change, s.how))
    waited = json.loads(receipt.recv_raw(timeout=WITHIN + 1, what="the receipt wait's answer"))
    check(waited.get("code") == "unauthorized", "receipt wait after %s: %r" % (change, waited))
    publish("rv.after")
    late = live.recv_or_none(WITHIN)
    check(late is None, "the live stream delivered after %s: %r" % (change, late))
    # The long-poll was answered as unauthorized, not with an empty page.
    lp = sessions[-1]
    check("status 401" in lp.how, "the long-poll after %s: %s" % (change, lp.how))
    # The old token opens nothing new.
    with client() as c:
        r = c.post("/v1/messages", json={"from": name, "to": peer, "body": {"n": "after"}}, headers=auth)
        check(r.status_code == 401, "send with the old token after %s -> %d" % (change, r.status_code))
    sent = [m["body"].get("n") for m in inbox_of(peer)]
    check(sent == ["before", "ws-before"], "stored from %s: %r" % (name, sent))
    log("%s: ws %.0f ms; %s" % (change, ws_end * 1000, ", ".join(
        "%s %.0f ms" % (s.what, (s.at - changed) * 1000) for s in sessions)))


def claimed_by_an_identity():
    """An unverified stream reading a name ends when that name gets an
    identity: from then on only the token may read its mail."""
    name = unique_name("claimed")

    def owner_stream(ready):
        with httpx.Client(base_url=base_url(), timeout=httpx.Timeout(10, read=30)) as c:
            with c.stream("GET", "/v1/agents/%s/stream" % name) as resp:
                check(resp.status_code == 200, "owner stream -> %d" % resp.status_code)
                ready.set()
                for _ in resp.iter_raw():
                    pass
        return "stream ended"

    def owner_poll(ready):
        with httpx.Client(base_url=base_url(), timeout=40) as c:
            threading.Timer(0.3, ready.set).start()
            resp = c.get("/v1/agents/%s/inbox" % name, params={"wait": 25})
        return "status %d %s" % (resp.status_code, resp.text[:200])

    held = [Ended("owner's v1 SSE stream", owner_stream), Ended("owner's long-poll", owner_poll)]
    for h in held:
        h.wait_ready()
    cli("agent", "add", "--json", name)
    added = time.monotonic()
    for h in held:
        h.thread.join(WITHIN + 1)
        check(h.at is not None and h.at - added < WITHIN,
              "the %s of %s outlived its new identity" % (h.what, name))
    check("status 403" in held[1].how, "the owner's long-poll: %s" % held[1].how)
    log("agent add: the unverified stream and long-poll of that name ended")


def main():
    one_change("revoke")
    one_change("rotate")
    claimed_by_an_identity()


if __name__ == "__main__":
    run(main)
