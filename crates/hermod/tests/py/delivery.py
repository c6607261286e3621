"""Delivery you can see, with real clients against the real daemon.

Proves (daemon started with ``[delivery] sweep_every = 0.2``):

* ``hermod send --notify read``: the recipient reads over the PyPI
  hermes-bus ``BusClient``; the sender's ``hermod recv`` shows a ``receipt``
  with state ``read`` and door ``unix``; ``GET /v1/messages/{id}`` and
  ``hermod receipt --wait read`` agree; the legacy client's frames carry no
  field it did not know unless the sender set one;
* ``bounce_after`` 2 s: a message to an agent that never connects bounces
  "never connected"; to a registered agent that stopped reading, "online
  but not reading";
* ``ttl`` 1 s: once expired the message is not delivered and its state is
  ``expired`` (the sender, who asked, is told);
* ``reply_to`` round-trips through agent-bus ``/send`` + ``/recv``, SSE
  interop ``/broadcast`` + ``/poll`` and v1; the original is ``replied``;
  ``hermod thread`` and ``GET /v1/threads/{id}`` list the conversation in
  order;
* a ping-pong between two scripted agents stops at the guard's limit with
  ``held``; the operator topic sees one notice; ``hermod release`` resumes
  them and the held message arrives;
* ``hermod presence set busy`` shows in ``hermod agents``, as a
  ``presence.*`` event, and in the answer to a send.

Env: HERMOD_BIN, HERMOD_SOCKET, HERMOD_URL."""
import json
import os
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Inbox, RawConn, check, log, new_client, run, stop_client, unique_name, wait_for,
)
from httpbus import client, expect_json  # noqa: E402

HERMOD = os.environ["HERMOD_BIN"]
SOCK = os.environ["HERMOD_SOCKET"]
# What hermes-bus 0.7.0 forwards, plus hermod's documented extras.
LEGACY_FIELDS = {"type", "id", "from", "to", "ts", "sent_ts", "channel", "seq", "auth", "body"}


def hermod(*args, check_ok=True, timeout=30):
    env = {k: v for k, v in os.environ.items() if k not in ("HERMOD_URL", "AGENT_NAME")}
    out = subprocess.run([HERMOD, *args, "--socket", SOCK], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if check_ok:
        check(out.returncode == 0, "hermod %s: exit %d: %s" % (" ".join(args), out.returncode,
                                                               out.stderr))
    return out


def send(*args):
    """``hermod send ...``: the id it prints, and its stderr (notices)."""
    out = hermod("send", *args)
    words = out.stdout.split()
    check(words[:1] == ["sent"], "hermod send printed %r" % out.stdout)
    return words[1], out.stderr


def recv_json(agent, timeout=15):
    out = hermod("recv", "--json", "--count", "1", "--timeout", str(timeout), agent)
    return json.loads(out.stdout.splitlines()[0])


def receipts(http, msg_id):
    return expect_json(http.get("/v1/messages/%s" % msg_id), 200, "GET /v1/messages/%s" % msg_id)


def state_of(http, msg_id, agent):
    for r in receipts(http, msg_id):
        for who in r["recipients"]:
            if who["agent"] == agent:
                return who
    return None


def read_receipt(http):
    alice, bob = unique_name("alice"), unique_name("bob")
    reader = new_client(bob)
    inbox = Inbox(reader)
    try:
        msg_id, _ = send("--from", alice, "--notify", "read", bob, "hello bob")
        got = inbox.wait_message(lambda f: f.get("id") == msg_id, 15, "bob's message")
        check(got["body"] == {"text": "hello bob"}, "body: %r" % got)
        # Only the field the sender set comes on top of what hermes-bus sends.
        check(set(got) <= LEGACY_FIELDS | {"notify"} and got["notify"] == ["read"],
              "fields a legacy client does not know: %r" % (set(got) - LEGACY_FIELDS))
        receipt = recv_json(alice)
        body = receipt["body"]
        check(receipt["from"] == "hermod" and body.get("type") == "receipt", "receipt: %r" % receipt)
        check((body["state"], body["door"], body["agent"], body["message"])
              == ("read", "unix", bob, msg_id), "receipt body: %r" % body)
        check(receipt.get("reply_to") == msg_id, "a receipt answers its message: %r" % receipt)
        who = state_of(http, msg_id, bob)
        check(who and who["state"] == "read", "GET state: %r" % who)
        check(any(s["state"] == "read" and s.get("door") == "unix" for s in who["steps"]),
              "GET steps: %r" % who)
        shown = hermod("receipt", "--wait", "read", "--timeout", "10", msg_id).stdout
        check("%s: read" % bob in shown, "hermod receipt: %r" % shown)
        # A reply carries its fields to the legacy client, which may ignore them.
        reply_id, _ = send("--from", alice, "--reply-to", msg_id, bob, "and more")
        got = inbox.wait_message(lambda f: f.get("id") == reply_id, 15, "the reply")
        check(got.get("reply_to") == msg_id and got.get("thread") == msg_id, "reply: %r" % got)
    finally:
        stop_client(reader)
    log("receipt: read over hermes-bus, told to the sender, GET and `hermod receipt` agree")


def bounces(http):
    sender, ghost = unique_name("sender"), unique_name("ghost")
    msg_id, _ = send("--from", sender, "--bounce-after", "2", ghost, "anyone there?")
    bounce = recv_json(sender, timeout=20)
    body = bounce["body"]
    check(body.get("state") == "bounced" and body.get("message") == msg_id, "bounce: %r" % bounce)
    check("never connected" in body.get("note", ""), "bounce reason: %r" % body)
    check(state_of(http, msg_id, ghost)["state"] == "bounced", "bounced state")
    # Registered, but it stopped reading: the daemon's frames sit unread.
    asleep = unique_name("asleep")
    conn = RawConn()
    conn.register(asleep)
    try:
        msg_id, _ = send("--from", sender, "--bounce-after", "2", asleep, "wake up")
        body = recv_json(sender, timeout=20)["body"]
        check(body.get("message") == msg_id and "online but not reading" in body.get("note", ""),
              "bounce reason: %r" % body)
    finally:
        conn.close()
    log("bounce: never connected, online but not reading")


def expiry(http):
    sender, late = unique_name("sender"), unique_name("late")
    msg_id, _ = send("--from", sender, "--ttl", "1", "--notify", "expired", late, "only for a second")
    time.sleep(1.2)  # the ttl itself: the message must be past it
    page = expect_json(http.get("/v1/agents/%s/inbox" % late), 200, "late's inbox")
    check(all(m["id"] != msg_id for m in page["messages"]), "an expired message was delivered")
    wait_for(lambda: state_of(http, msg_id, late)["state"] == "expired", 10, "state expired")
    body = recv_json(sender)["body"]
    check((body.get("state"), body.get("message")) == ("expired", msg_id), "told: %r" % body)
    log("ttl: not delivered once expired, state expired, sender told")


def threads(http):
    a, b = unique_name("ab-a"), unique_name("ab-b")
    first = expect_json(http.post("/send", json={"from": a, "to": b, "msg": "question?"}),
                        200, "agent-bus /send")
    root = first["id"]
    expect_json(http.post("/send", json={"from": b, "to": a, "msg": "answer!", "reply_to": root}),
                200, "agent-bus /send with reply_to")
    got = expect_json(http.get("/recv", params={"to": a}), 200, "agent-bus /recv")["messages"]
    answer = [m for m in got if m["msg"] == "answer!"]
    check(answer and answer[0].get("reply_to") == root and answer[0].get("thread") == root,
          "agent-bus /recv: %r" % got)
    wait_for(lambda: state_of(http, root, b)["state"] == "replied", 10, "the original replied")
    # SSE interop: a broadcast answering the root reaches a /poll reader.
    watcher = unique_name("interop")
    expect_json(http.get("/poll", params={"agent": watcher}), 200, "/poll (to be known)")
    expect_json(http.post("/broadcast", params={"from": a, "reply_to": root}, json={"text": "fyi all"}),
                200, "/broadcast with reply_to")
    polled = expect_json(http.get("/poll", params={"agent": watcher}), 200, "/poll")
    meta = [m["_meta"] for m in polled if m.get("text") == "fyi all"]
    check(meta and meta[0].get("reply_to") == root and meta[0].get("thread") == root,
          "interop _meta: %r" % polled)
    # v1.
    v1 = expect_json(http.post("/v1/messages", json={"from": a, "to": b, "reply_to": root,
                                                      "body": {"text": "closing"}}),
                     200, "v1 send with reply_to")
    page = expect_json(http.get("/v1/agents/%s/inbox" % b), 200, "v1 inbox")["messages"]
    mine = [m for m in page if m["id"] == v1["id"]]
    check(mine and mine[0].get("reply_to") == root and mine[0].get("thread") == root, "v1: %r" % page)
    listed = expect_json(http.get("/v1/threads/%s" % v1["id"]), 200, "GET /v1/threads")
    check([m["body"].get("text") for m in listed] == ["question?", "answer!", "fyi all", "closing"],
          "thread order: %r" % listed)
    lines = hermod("thread", root).stdout.splitlines()
    check(len(lines) == 4 and "question?" in lines[0] and "closing" in lines[3], "hermod thread: %r" % lines)
    log("threads: reply_to over agent-bus, SSE interop and v1; replied; listed in order")


def loop_guard(http):
    a, b = unique_name("ping"), unique_name("pong")
    ops = RawConn()
    reply = ops.request({"type": "subscribe", "pattern": "hermod.guard"})
    ops.expect_type(reply, "subscribed", "operator subscribe")
    ca, cb = RawConn(), RawConn()
    ca.register(a)
    cb.register(b)
    conns = {a: ca, b: cb}
    held = None
    for turn in range(1, 41):
        me, other = (a, b) if turn % 2 else (b, a)
        _, sent = conns[me].send_durable(other, {"text": "turn %d" % turn}, me)
        if "held by the loop guard" in (sent.get("notice") or ""):
            held = (turn, sent, other)
            break
        got = conns[other].recv_message(lambda f: f.get("body", {}).get("text") == "turn %d" % turn,
                                        10, "turn %d" % turn)
        check(got, "turn %d arrived" % turn)
    check(held is not None and held[0] == 31, "the guard held turn %r (limit 30)" % (held and held[0]))
    turn, sent, other = held
    wait_for(lambda: (state_of(http, sent["id"], other) or {}).get("state") == "held", 10,
             "the held message's state")
    # One more in the pair is held too, without a second notice.
    conns[other].send_durable(a if other == b else b, {"text": "turn 32"}, other)
    notices = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        f = ops.recv_or_none(0.5)
        if f and f.get("topic") == "hermod.guard":
            notices.append(f)
    check(len(notices) == 1, "operator notices: %r" % notices)
    for conn in (ca, cb):
        conn.recv_message(lambda f: f.get("body", {}).get("type") == "loop_guard", 10, "guard notice")
    out = hermod("release", a, b).stdout
    check("2 held message(s) went on" in out, "release: %r" % out)
    conns[other].recv_message(lambda f: f.get("body", {}).get("text") == "turn %d" % turn, 10,
                              "the held message after release")
    for c in (ops, ca, cb):
        c.close()
    log("loop guard: held at 31 turns, one operator notice, released")


def presence(http):
    pat = unique_name("pat")
    env = {k: v for k, v in os.environ.items() if k != "HERMOD_URL"}
    sub = subprocess.Popen([HERMOD, "sub", "--socket", SOCK, "--count", "1", "presence.**"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(sub.stdout.readline()), daemon=True)
        reader.start()
        # `hermod sub` sees what is published once it has subscribed: each
        # set publishes again, until one reaches it.
        deadline = time.monotonic() + 15
        while not lines and time.monotonic() < deadline:
            hermod("presence", "set", "busy", "--agent", pat)
            reader.join(0.3)
        check(lines and lines[0], "hermod sub printed nothing")
        event = json.loads(lines[0])
    finally:
        sub.kill()
        sub.wait(5)
    text = json.dumps(event)
    check('"presence.%s"' % pat in text and '"busy"' in text, "presence event: %r" % event)
    rows = [line for line in hermod("agents").stdout.splitlines() if line.startswith(pat)]
    check(rows and rows[0].split()[3] == "busy", "hermod agents: %r" % rows)
    _, notice = send("--from", unique_name("s"), pat, "when you can")
    check("busy: it will see this at its next turn" in notice, "send notice: %r" % notice)
    hermod("presence", "set", "idle", "--agent", pat)
    rows = [line for line in hermod("agents").stdout.splitlines() if line.startswith(pat)]
    check(rows[0].split()[3] == "idle", "hermod agents after idle: %r" % rows)
    log("presence: busy in agents, as an event and in the send answer")


def main():
    with client() as http:
        read_receipt(http)
        bounces(http)
        expiry(http)
        threads(http)
        loop_guard(http)
        presence(http)


run(main)
