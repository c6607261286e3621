"""Run as another local user (uid `nobody`, via setpriv) against a daemon
whose socket that user can reach: without a token every request is refused
(the refusal comes from peer credentials, not file modes); with a token it
works and the sender is the token's agent. Standard library only (this user
cannot read the test virtualenv).

Env: HERMOD_SOCKET, HERMOD_URL, AGENT_TOKEN, AGENT_NAME."""
import json
import os
import socket
import struct
import sys
import urllib.error
import urllib.request

SOCK = os.environ["HERMOD_SOCKET"]
URL = os.environ["HERMOD_URL"].rstrip("/")
TOKEN = os.environ["AGENT_TOKEN"]
NAME = os.environ["AGENT_NAME"]


def fail(why):
    print("FAIL as_nobody.py (uid %d): %s" % (os.getuid(), why), file=sys.stderr)
    sys.exit(1)


def check(cond, why):
    if not cond:
        fail(why)


def unix(frames):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(SOCK)  # the file mode lets us in: what refuses is the daemon
    out = []
    for f in frames:
        data = json.dumps(f).encode()
        s.sendall(struct.pack(">I", len(data)) + data)
        head = b""
        while len(head) < 4:
            chunk = s.recv(4 - len(head))
            check(chunk, "the daemon closed the socket")
            head += chunk
        (n,) = struct.unpack(">I", head)
        body = b""
        while len(body) < n:
            body += s.recv(n - len(body))
        out.append(json.loads(body))
    s.close()
    return out


def http(method, path, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(URL + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main():
    check(os.getuid() != 0, "this script must run as another user")
    # Unix socket, no token: every frame is refused.
    for reply in unix([
        {"type": "register", "endpoint": "victim"},
        {"type": "send", "to": "victim", "from": "boss", "body": {"text": "run this"}},
        {"type": "inbox", "agent": "victim"},
        {"type": "list_endpoints"},
    ]):
        check(reply.get("type") == "error" and reply.get("code") == "unauthorized",
              "unix without a token: %r" % reply)
    # With the token: it works, as the token's agent, and only as it.
    sent, spoof = unix([
        {"type": "send", "to": "victim", "token": TOKEN, "body": {"text": "hello from nobody"}},
        {"type": "send", "to": "victim", "from": "boss", "token": TOKEN, "body": {"text": "spoof"}},
    ])
    check(sent.get("type") == "sent", "unix with a token: %r" % sent)
    check(spoof.get("code") == "forbidden_sender", "unix spoof with a token: %r" % spoof)

    # Every HTTP route refuses without a token.
    routes = [
        ("GET", "/healthz", None), ("GET", "/health", None), ("GET", "/status", None),
        ("GET", "/inbox", None), ("GET", "/recv?to=victim", None), ("GET", "/poll?agent=victim", None),
        ("GET", "/subscribe?agent=victim", None), ("POST", "/send", {"from": "boss", "to": "victim", "msg": "x"}),
        ("POST", "/broadcast?from=boss", {"text": "x"}), ("GET", "/v1/agents", None),
        ("GET", "/v1/agents/victim/inbox", None), ("GET", "/v1/agents/victim/stream", None),
        ("POST", "/v1/messages", {"from": "boss", "to": "victim", "body": {}}),
        ("POST", "/v1/agents/victim/ack", {"seq": 1}), ("GET", "/v1/events", None),
        ("POST", "/v1/events", {"topic": "a.b"}), ("GET", "/v1/openapi.json", None),
        ("GET", "/metrics", None), ("GET", "/nonexistent", None),
    ]
    for method, path, body in routes:
        status, text = http(method, path, body)
        check(status == 401, "%s %s without a token: %d %s" % (method, path, status, text[:200]))
        check(json.loads(text).get("code") == "unauthorized", "%s %s: %s" % (method, path, text))
    # With it: sender is the token's agent.
    status, text = http("POST", "/send", {"from": NAME, "to": "victim", "msg": "over http"}, TOKEN)
    check(status == 200, "http send with a token: %d %s" % (status, text))
    status, text = http("POST", "/send", {"from": "boss", "to": "victim", "msg": "spoof"}, TOKEN)
    check(status == 403 and json.loads(text)["code"] == "forbidden_sender", "http spoof: %d %s" % (status, text))
    status, text = http("GET", "/recv?to=%s&since=0" % NAME, None, TOKEN)
    check(status == 200, "http recv of its own inbox: %d %s" % (status, text))
    status, text = http("GET", "/poll?agent=victim", None, TOKEN)
    check(status == 403, "http poll of another inbox with a token: %d %s" % (status, text))
    print("PASS as_nobody.py: refused without a token on the socket and %d routes; works with one" % len(routes))


main()
