"""Who may send, register and read, over the Unix socket and HTTP: agent
identities made with `hermod agent add`, tokens on every transport (a
`token` frame field, `Authorization: Bearer`, the `/a/TOKEN` base URL the
agent-bus scripts and SSE-interop clients take, `?token=` on the relay),
spoofing refused, ACL rules named, and how each delivered message says its
sender was verified.

Env: HERMOD_BIN, HERMOD_SOCKET, HERMOD_URL."""
import json
import os
import subprocess
import urllib.request

from common import RawConn, check, log, run, unique_name
from httpbus import base_url, client, expect_error, expect_json

HERMOD = os.environ["HERMOD_BIN"]
SOCK = os.environ["HERMOD_SOCKET"]


def cli(*args):
    """`hermod agent ...` as the owner (no token)."""
    env = {k: v for k, v in os.environ.items() if k != "HERMOD_TOKEN"}
    out = subprocess.run([HERMOD, *args, "--socket", SOCK], capture_output=True, text=True,
                         timeout=30, env=env)
    check(out.returncode == 0, "hermod %s: %s" % (" ".join(args), out.stderr))
    return out


def add(name, *rules):
    out = cli("agent", "add", "--json", *rules, name)
    identity = json.loads(out.stdout)
    check(identity["name"] == name and identity["token"].startswith("hmd_"), "agent add: %r" % identity)
    return identity["token"]


def reply(conn):
    return json.loads(conn.recv_raw(what="a reply"))


def error_code(obj):
    check(obj.get("type") == "error", "expected an error frame, got %r" % obj)
    return obj["code"]


def unix_identities(alice, bob, carol):
    # A token's sender is its agent: claiming another name is refused.
    c = RawConn()
    c.send_obj({"type": "send", "to": carol, "from": bob["name"], "token": alice["token"], "body": {"text": "spoof"}})
    check(error_code(reply(c)) == "forbidden_sender", "send as bob with alice's token")
    # ... and so is registering as another name, so nobody kicks bob.
    c.send_obj({"type": "register", "endpoint": bob["name"], "token": alice["token"]})
    check(error_code(reply(c)) == "forbidden", "register as bob with alice's token")
    # A name with an identity is reserved, even for the owner's processes.
    o = RawConn()
    o.send_obj({"type": "register", "endpoint": alice["name"]})
    check(error_code(reply(o)) == "forbidden", "register as alice without her token")
    o.send_obj({"type": "send", "to": carol, "from": alice["name"], "body": {"text": "spoof"}})
    check(error_code(reply(o)) == "forbidden_sender", "send as alice without her token")
    # A bad token is refused outright.
    o.send_obj({"type": "send", "to": carol, "token": "hmd_not-a-token", "body": {}})
    check(error_code(reply(o)) == "unauthorized", "unknown token")

    # Registered with its token, the connection speaks as alice.
    a = RawConn()
    a.send_obj({"type": "register", "endpoint": alice["name"], "token": alice["token"]})
    check(reply(a).get("type") == "registered", "alice registers with her token")
    a.send_obj({"type": "send", "to": carol, "body": {"text": "from alice"}})
    sent = reply(a)
    check(sent.get("type") == "sent", "alice sends: %r" % sent)

    # The owner's unchanged clients need no token; their messages say so.
    o.send_obj({"type": "send", "to": alice["name"], "from": "ops", "body": {"text": "from the owner"}})
    check(reply(o).get("type") == "sent", "owner send")
    b = RawConn()
    b.send_obj({"type": "send", "to": alice["name"], "body": {"text": "from bob"}, "token": bob["token"]})
    check(reply(b).get("type") == "sent", "bob sends with his token")
    got = [reply(a), reply(a)]
    by_text = {m["body"]["text"]: m for m in got}
    check(by_text["from the owner"]["auth"] == "owner" and by_text["from the owner"]["from"] == "ops",
          "owner message: %r" % by_text["from the owner"])
    check(by_text["from bob"]["auth"] == "token" and by_text["from bob"]["from"] == bob["name"],
          "token message: %r" % by_text["from bob"])
    log("unix: spoofing refused, tokens verified, auth on every frame")


def http_identities(alice, bob, carol):
    auth = {"Authorization": "Bearer " + alice["token"]}
    with client() as h:
        r = h.post("/send", json={"from": bob["name"], "to": carol, "msg": "spoof"}, headers=auth)
        expect_error(r, 403, "agent-bus /send as bob with alice's token", "forbidden_sender")
        r = h.post("/v1/messages", json={"from": bob["name"], "to": carol, "body": {}}, headers=auth)
        expect_error(r, 403, "v1 send as bob with alice's token", "forbidden_sender")
        r = h.get("/v1/agents/%s/inbox" % bob["name"], headers=auth)
        expect_error(r, 403, "reading bob's inbox with alice's token", "forbidden")
        r = h.get("/poll", params={"agent": bob["name"]}, headers=auth)
        expect_error(r, 403, "polling bob's inbox with alice's token", "forbidden")
        r = h.post("/send", json={"from": alice["name"], "to": carol, "msg": "spoof"})
        expect_error(r, 403, "the owner claiming alice", "forbidden_sender")
        r = h.post("/send", json={"from": "x", "to": carol, "msg": "m"},
                   headers={"Authorization": "Bearer hmd_wrong"})
        body = expect_error(r, 401, "a wrong token", "unauthorized")
        check("token" in body["error"], body)
        r = h.post("/v1/messages", json={"from": alice["name"], "to": carol, "body": {"n": 1}}, headers=auth)
        expect_json(r, 200, "alice's v1 send")
        r = h.get("/v1/agents/%s/inbox" % carol)
        page = expect_json(r, 200, "carol's inbox (owner)")
        mine = [m for m in page["messages"] if m["from"] == alice["name"]]
        check(mine and all(m["auth"] == "token" for m in mine), "v1 view auth: %r" % page)

    # The agent-bus scripts take only a base URL: the token rides in its path.
    base = "%s/a/%s" % (base_url(), bob["token"])
    req = urllib.request.Request(base + "/send", method="POST",
                                 data=json.dumps({"from": bob["name"], "to": alice["name"], "msg": "via /a/"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        check(json.load(resp)["ok"] is True, "agent-bus send through /a/TOKEN")
    with urllib.request.urlopen(base + "/recv?to=%s&since=0" % bob["name"], timeout=10) as resp:
        check("messages" in json.load(resp), "agent-bus recv through /a/TOKEN")
    abase = "%s/a/%s" % (base_url(), alice["token"])
    with urllib.request.urlopen(abase + "/recv?to=%s&since=0" % alice["name"], timeout=10) as resp:
        msgs = json.load(resp)["messages"]
    via = [m for m in msgs if m["msg"] == "via /a/"]
    check(via and via[0]["from"] == bob["name"] and via[0]["auth"] == "token", "recv item: %r" % msgs)
    # SSE interop through the same base URL: /poll returns and claims.
    with urllib.request.urlopen(abase + "/poll?agent=%s" % alice["name"], timeout=10) as resp:
        polled = json.load(resp)
    check(any(p["_meta"]["auth"] == "token" and p["_meta"]["from"] == bob["name"] for p in polled),
          "interop _meta: %r" % polled)
    log("http: Bearer and /a/TOKEN work, spoofing refused, auth in every view")


def acl_rules():
    worker = unique_name("worker")
    boss = unique_name("boss")
    token = add(worker, "--channel", "ops", "--may-send", boss, "--may-publish", "ci.*",
                "--may-subscribe", "ci.**")
    auth = {"Authorization": "Bearer " + token}
    with client() as h:
        r = h.post("/v1/messages", json={"from": worker, "to": boss, "channel": "ops", "body": {}}, headers=auth)
        expect_json(r, 200, "send within may_send")
        cases = [
            ("may_send", h.post("/v1/messages", json={"to": "someone", "from": worker, "channel": "ops", "body": {}}, headers=auth)),
            ("may_send", h.post("/v1/messages", json={"from": worker, "channel": "ops", "body": {}}, headers=auth)),
            ("channel", h.post("/v1/messages", json={"from": worker, "to": boss, "body": {}}, headers=auth)),
            ("may_publish", h.post("/v1/events", json={"topic": "tui.x", "channel": "ops", "payload": {}}, headers=auth)),
            ("may_subscribe", h.post("/v1/agents/%s/subscriptions" % worker, json={"pattern": "**", "channel": "ops"}, headers=auth)),
            ("admin", h.get("/metrics", headers=auth)),
        ]
        for rule, r in cases:
            body = expect_error(r, 403, "rule %s" % rule, "forbidden")
            check(rule in body["error"], "the error names rule %s: %r" % (rule, body))
        r = h.post("/v1/events", json={"topic": "ci.done", "channel": "ops", "payload": {}, "durable": True}, headers=auth)
        expect_json(r, 200, "publish within may_publish")
    c = RawConn()
    c.send_obj({"type": "subscribe", "pattern": "tui.**", "token": token})
    check(error_code(reply(c)) == "forbidden", "a live subscription outside may_subscribe")
    log("acl: every rule refuses with 403 naming itself")


def relay_with_an_agent_token():
    """`?token=` on the relay WebSockets takes an agent token too: events then
    carry the agent's name and its may_publish rule applies."""
    import time

    import websockets.exceptions
    import websockets.sync.client as ws
    pub, dash = unique_name("relay-pub"), unique_name("dash")
    token = add(pub, "--may-publish", "gateway.**")
    with client() as h:
        r = h.post("/v1/agents/%s/subscriptions" % dash, json={"pattern": "**", "channel": "gateway"})
        expect_json(r, 200, "dash subscribes")
    url = base_url().replace("http", "ws", 1) + "/api/pub?channel=gateway&token="
    frame = lambda topic: json.dumps({"_bus_relay": True, "topic": topic,
                                      "envelope": {"type": topic, "ts": 1.0, "src": topic.split(".")[0]}})
    with ws.connect(url + token, open_timeout=10) as conn:
        conn.send(frame("gateway.agent.start"))
        conn.send(frame("tui.forbidden"))  # outside may_publish: dropped
        conn.send(frame("gateway.agent.end"))
    try:
        ws.connect(url + "hmd_wrong", open_timeout=10).close()
        check(False, "a wrong relay token was accepted")
    except websockets.exceptions.InvalidStatus as e:
        check(e.response.status_code == 401, "wrong relay token: %s" % e.response.status_code)
    deadline = time.monotonic() + 10
    with client() as h:
        while True:
            page = expect_json(h.get("/v1/agents/%s/inbox" % dash, params={"channel": "gateway"}), 200, "dash inbox")
            topics = [m["topic"] for m in page["messages"]]
            if "gateway.agent.end" in topics:
                break
            check(time.monotonic() < deadline, "relayed events never arrived: %r" % topics)
            time.sleep(0.05)
    check(topics == ["gateway.agent.start", "gateway.agent.end"], "relayed topics: %r" % topics)
    check(all(m["from"] == pub and m["auth"] == "token" for m in page["messages"]), "relayed: %r" % page)
    log("relay: an agent token opens /api/pub within its rules; a wrong one gets 401")


def rotate_and_revoke(alice):
    old = alice["token"]
    new = json.loads(cli("agent", "rotate", "--json", alice["name"]).stdout)["token"]
    check(new != old, "rotate issues a new token")
    c = RawConn()
    c.send_obj({"type": "send", "to": "x", "token": old, "body": {}})
    check(error_code(reply(c)) == "unauthorized", "the old token stops working")
    c.send_obj({"type": "send", "to": "x", "token": new, "body": {}})
    check(reply(c).get("type") == "sent", "the new token works")
    listed = cli("agent", "list", "--json").stdout
    check(alice["name"] in listed and "hmd_" not in listed and "token_hash" not in listed,
          "list shows identities, never tokens: %s" % listed)
    cli("agent", "revoke", alice["name"])
    c.send_obj({"type": "send", "to": "x", "token": new, "body": {}})
    check(error_code(reply(c)) == "unauthorized", "a revoked token stops working")
    log("rotate and revoke take effect at once")


def main():
    alice = {"name": unique_name("alice")}
    bob = {"name": unique_name("bob")}
    carol = unique_name("carol")
    alice["token"] = add(alice["name"])
    bob["token"] = add(bob["name"])
    unix_identities(alice, bob, carol)
    http_identities(alice, bob, carol)
    acl_rules()
    relay_with_an_agent_token()
    rotate_and_revoke(alice)


if __name__ == "__main__":
    run(main)
