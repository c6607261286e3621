"""HTTP limits and bad input: precise errors, nothing stored, daemon unharmed.

Proves:

1. An 11 MiB body to ``POST /send``, ``POST /broadcast`` and ``POST
   /v1/messages`` -- with Content-Length and chunked -- gets 413 and a JSON
   ``{"error", "code": "frame_too_large"}``; the boundary is exact (a request
   body of exactly 10 MiB is accepted, 10 MiB + 1 byte is 413).  After a
   413 the connection either stays usable or the response says
   ``Connection: close`` (keep-alive clients must not lose their next
   request).
2. Just under the limit: a ~9 MiB ``msg`` (unicode, quotes, backslashes,
   newlines) round-trips through ``/recv`` and the v1 inbox unchanged, and a
   ~9 MiB v1 body comes back from the v1 inbox byte for byte.
3. Broken JSON, invalid UTF-8 and an empty body get 400 ``invalid_json``
   with an error naming the problem; JSON that is not an object gets 400.
4. Wrong field types and missing fields get 400 (``/send``, ``/broadcast``,
   ``/v1/messages``, ``/v1/agents/{n}/ack``).
5. Bad names (``"bad name"``, 129 chars, empty, non-ASCII, ``a/b``) get 400
   ``invalid_name`` wherever a name or channel is taken (bodies, query
   parameters, URL paths; an empty *channel* means ``default``, as on the
   Unix socket); a 128-char name is accepted.
6. Unknown routes get a 404 JSON ``not_found``, a wrong method on a known
   route a 405 (or 404) that is JSON too; ``/recv`` without ``to``,
   ``/poll`` and ``/subscribe`` without ``agent``, ``/broadcast`` without
   ``from`` and malformed query values get 400 JSON.
7. None of the rejected requests stored anything, and afterwards the daemon
   still serves HTTP and the Unix socket.
"""
import json
import os
import socket
import sys
import time
import urllib.parse

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import check, daemon_alive, is_int, log, run, unique_name  # noqa: E402
import httpbus  # noqa: E402
from httpbus import expect_error, expect_json  # noqa: E402

MiB = 1024 * 1024
LIMIT = 10 * MiB
BIG_TIMEOUT = 60.0

SINK = unique_name("lim-sink")   # every rejected request names this recipient
SENDER = unique_name("lim-from")


def post_raw(http, path, data, params=None, headers=None):
    h = {"content-type": "application/json"}
    h.update(headers or {})
    return http.post(path, content=data, params=params, headers=h)


def chunks(data, size=65536):
    for k in range(0, len(data), size):
        yield data[k:k + size]


TOO_LARGE_ERRORS = []  # (context, error text), checked at the end


def check_too_large(resp, context):
    body = expect_error(resp, 413, context, code="frame_too_large")
    TOO_LARGE_ERRORS.append((context, body["error"]))


def check_too_large_texts():
    """The 413 error text must not misstate the size (checked last so the
    other checks run first)."""
    for context, text in TOO_LARGE_ERRORS:
        check(" 0 bytes" not in text,
              "%s: the 413 error claims the body was 0 bytes: %r" % (context, text))


def sink_is_empty(http, context):
    for ch in ("default", "lim-ch"):
        page = expect_json(http.get("/v1/agents/%s/inbox" % SINK, params={"after": "0", "channel": ch}),
                           200, "v1 inbox of the sink")
        check(page.get("messages") == [],
              "%s: a rejected request was stored: %s" % (context, str(page)[:500]))


# ── 1. over the limit ─────────────────────────────────────────────────────

def oversized_requests():
    fill = "x" * (11 * MiB)
    return [
        ("/send", None, {"from": SENDER, "to": SINK, "msg": fill}),
        ("/broadcast", {"from": SENDER}, {"text": fill}),
        ("/v1/messages", None, {"from": SENDER, "to": SINK, "body": {"text": fill}}),
    ]


def test_too_large():
    for path, params, obj in oversized_requests():
        data = json.dumps(obj).encode()
        check(len(data) > 11 * MiB, "unreachable")
        # a fresh connection each: see test_connection_after_413 for reuse
        with httpbus.client(timeout=BIG_TIMEOUT) as http:
            check_too_large(post_raw(http, path, data, params=params),
                            "POST %s with an 11 MiB body (Content-Length)" % path)
        with httpbus.client(timeout=BIG_TIMEOUT) as http:
            check_too_large(http.post(path, content=chunks(data), params=params,
                                      headers={"content-type": "application/json"}),
                            "POST %s with an 11 MiB body (chunked)" % path)
        log("413 frame_too_large: POST %s (Content-Length and chunked)" % path)

    # the boundary: exactly 10 MiB is a legal body, one byte more is not
    edge = unique_name("lim-edge")
    for path, head, tail in (
            ("/send", b'{"from":"%s","to":"%s","msg":"' % (SENDER.encode(), edge.encode()), b'"}'),
            ("/v1/messages", b'{"from":"%s","to":"%s","body":{"t":"' % (SENDER.encode(), edge.encode()),
             b'"}}'),
    ):
        fill = LIMIT - len(head) - len(tail)
        exact = head + b"y" * fill + tail
        over = head + b"y" * (fill + 1) + tail
        check(len(exact) == LIMIT and len(over) == LIMIT + 1, "unreachable")
        with httpbus.client(timeout=BIG_TIMEOUT) as http:
            check_too_large(post_raw(http, path, over),
                            "POST %s with a body of 10 MiB + 1 byte" % path)
        with httpbus.client(timeout=BIG_TIMEOUT) as http:
            r = expect_json(post_raw(http, path, exact), 200,
                            "POST %s with a body of exactly 10 MiB" % path)
            check(is_int(r.get("seq")), "POST %s exactly 10 MiB: reply %r" % (path, r))
            # it really is there, whole
            page = expect_json(http.get("/v1/agents/%s/inbox" % edge,
                                        params={"after": str(r["seq"] - 1), "limit": "1"}),
                               200, "v1 inbox after the 10 MiB send")
            msgs = page.get("messages") or []
            check(len(msgs) == 1 and msgs[0].get("seq") == r["seq"],
                  "the exactly-10 MiB message from POST %s is not in the inbox" % path)
            got = msgs[0]["body"]
            val = got.get("text") if path == "/send" else got.get("t")
            check(isinstance(val, str) and val == "y" * fill,
                  "the exactly-10 MiB message from POST %s came back altered (%r chars)"
                  % (path, len(val) if isinstance(val, str) else val))
            all_edge = expect_json(http.get("/v1/agents/%s/inbox" % edge, params={"after": "0"}),
                                   200, "v1 inbox of the boundary recipient")
            check(len(all_edge.get("messages") or []) == (1 if path == "/send" else 2),
                  "a 10 MiB + 1 byte request was stored: the boundary recipient has %d messages"
                  % len(all_edge.get("messages") or []))
        log("POST %s: exactly 10 MiB accepted, 10 MiB + 1 -> 413" % path)


def test_connection_after_413():
    """A 413 either leaves the connection usable or says Connection: close."""
    url = urllib.parse.urlsplit(httpbus.base_url())
    data = json.dumps({"from": SENDER, "to": SINK, "msg": "z" * (11 * MiB)}).encode()
    s = socket.create_connection((url.hostname, url.port), timeout=30)
    try:
        s.sendall(b"POST /send HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (url.netloc.encode(), len(data)))
        try:
            s.sendall(data)
        except OSError:
            pass  # the daemon may stop reading once over the limit
        buf = b""
        deadline = time.monotonic() + 30
        while b"\r\n\r\n" not in buf and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        check(lines and " 413 " in lines[0] + " ",
              "raw POST /send with 11 MiB: expected 413, got %r" % head[:300])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip().lower()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        says_close = "close" in headers.get("connection", "")
        # is the connection still usable for the next request?
        usable = False
        reason = ""
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: %s\r\n\r\n" % url.netloc.encode())
            s.settimeout(5)
            nxt = s.recv(65536)
            usable = nxt.startswith(b"HTTP/1.1 200")
            reason = "the next request got %r" % nxt[:60]
        except OSError as e:
            reason = "the next request failed: %s" % e
        check(usable or says_close,
              "after a 413 the daemon closed the keep-alive connection without saying "
              "'Connection: close' in the 413 response (headers %r); %s. A keep-alive client "
              "(httpx) that reuses the connection loses its next request with 'Server "
              "disconnected without sending a response'" % (headers, reason))
    finally:
        s.close()
    log("after a 413 the connection is %s" % ("reusable" if usable else "closed with Connection: close"))


# ── 2. just under the limit ───────────────────────────────────────────────

def big_text(n_bytes):
    unit = 'ab "quoted" back\\slash\nnew line é ü 日本 🎉 tab\t end. '
    unit_b = len(unit.encode("utf-8"))
    reps = n_bytes // unit_b
    return unit * reps


def test_under_limit():
    me = unique_name("lim-big")
    msg = big_text(9 * MiB)
    payload = json.dumps({"from": SENDER, "to": me, "msg": msg}, ensure_ascii=False).encode("utf-8")
    check(9 * MiB - 200 < len(payload) < LIMIT, "payload size %d" % len(payload))
    with httpbus.client(timeout=BIG_TIMEOUT) as http:
        r = expect_json(post_raw(http, "/send", payload), 200, "POST /send with a ~9 MiB msg")
        got = expect_json(http.get("/recv", params={"to": me, "since": "0"}), 200, "GET /recv of 9 MiB")
        msgs = got.get("messages") or []
        check(len(msgs) == 1, "GET /recv after a 9 MiB send returned %d messages" % len(msgs))
        check(msgs[0].get("seq") == r["seq"], "GET /recv returned another message")
        check(msgs[0].get("msg") == msg,
              "the ~9 MiB msg came back from /recv altered (%d chars sent, %r back)"
              % (len(msg), len(msgs[0].get("msg") or "")))
        page = expect_json(http.get("/v1/agents/%s/inbox" % me, params={"after": "0"}), 200,
                           "v1 inbox of the 9 MiB message")
        vm = page.get("messages") or []
        check(len(vm) == 1 and vm[0].get("body") == {"text": msg},
              "the ~9 MiB msg is not {\"text\": msg} in the v1 inbox")
        log("~9 MiB msg: /send -> /recv and v1 inbox unchanged (%d bytes)" % len(payload))

        # a v1 body, formatted as a client might (spaces, escapes, raw UTF-8),
        # comes back byte for byte
        me2 = unique_name("lim-raw")
        chunk = '{"k": [1, 2.50, true, null], "s": "\\u00e9 é \\n 🎉", "e": {}}'
        reps = (9 * MiB) // (len(chunk.encode("utf-8")) + 1)
        raw_body = ('{"items": [' + ",".join([chunk] * reps) + '],  "end" : "fin" }').encode("utf-8")
        req = (b'{"from": "%s", "to": "%s", "body": ' % (SENDER.encode(), me2.encode())
               + raw_body + b"}")
        check(len(req) < LIMIT, "request %d bytes" % len(req))
        r2 = expect_json(post_raw(http, "/v1/messages", req), 200, "POST /v1/messages ~9 MiB body")
        resp = http.get("/v1/agents/%s/inbox" % me2, params={"after": "0"})
        page = expect_json(resp, 200, "v1 inbox of the 9 MiB body")
        vm = page.get("messages") or []
        check(len(vm) == 1 and vm[0].get("seq") == r2["seq"], "v1 inbox: the 9 MiB body is missing")
        check(vm[0]["body"] == json.loads(raw_body), "the ~9 MiB v1 body came back with other content")
        check(raw_body in resp.content,
              "the ~9 MiB v1 body is not in the inbox reply byte for byte")
        log("~9 MiB v1 body: byte-identical in the v1 inbox (%d bytes)" % len(raw_body))


# ── 3./4. broken JSON, wrong types ────────────────────────────────────────

POST_ENDPOINTS = [
    ("/send", None),
    ("/broadcast", {"from": SENDER}),
    ("/v1/messages", None),
    ("/v1/agents/%s/ack" % SINK, None),
]


def test_broken_json(http):
    cases = [
        (b'{"from": "a", "to": ', "truncated"),
        (b"not json at all", "not JSON"),
        (b'{"from": "a",, "to": "b"}', "double comma"),
        (b'{"from": "\xff\xfe", "to": "b", "msg": "x"}', "invalid UTF-8"),
        (b"", "empty body"),
    ]
    for path, params in POST_ENDPOINTS:
        for data, what in cases:
            ctx = "POST %s with %s" % (path, what)
            body = expect_error(post_raw(http, path, data, params=params), 400, ctx, code="invalid_json")
            err = body["error"].lower()
            check(any(w in err for w in ("line", "column", "eof", "expected", "utf", "invalid", "empty")),
                  "%s: the error does not say what is wrong: %r" % (ctx, body["error"]))
    log("broken JSON: 400 invalid_json naming the problem on %d endpoints" % len(POST_ENDPOINTS))

    not_objects = [b"[1, 2]", b'"str"', b"3", b"null", b"true"]
    for path, params in POST_ENDPOINTS:
        for data in not_objects:
            expect_error(post_raw(http, path, data, params=params), 400,
                         "POST %s with the JSON %s (not an object)" % (path, data.decode()))
    log("JSON that is not an object: 400 on %d endpoints" % len(POST_ENDPOINTS))


def test_wrong_types(http):
    f, t = SENDER, SINK
    send_cases = [
        ({"from": f, "to": t}, "msg missing"),
        ({"to": t, "msg": "x"}, "from missing"),
        ({"from": f, "msg": "x"}, "to missing"),
        ({"from": f, "to": t, "msg": 123}, "msg a number"),
        ({"from": f, "to": t, "msg": None}, "msg null"),
        ({"from": f, "to": t, "msg": {"text": "x"}}, "msg an object"),
        ({"from": f, "to": t, "msg": ["x"]}, "msg a list"),
        ({"from": 5, "to": t, "msg": "x"}, "from a number"),
        ({"from": f, "to": ["x"], "msg": "x"}, "to a list"),
        ({"from": f, "to": t, "msg": "x", "channel": 7}, "channel a number"),
    ]
    for obj, what in send_cases:
        expect_error(http.post("/send", json=obj), 400, "POST /send with %s" % what)
    log("POST /send: %d wrong/missing fields -> 400" % len(send_cases))

    expect_error(http.post("/broadcast", params={"from": f}, content=b"[]"), 400,
                 "POST /broadcast with a list body")

    v1_cases = [
        ({"from": f, "to": t}, "body missing"),
        ({"to": t, "body": {}}, "from missing"),
        ({"from": f, "to": t, "broadcast": True, "body": {}}, "both to and broadcast"),
        ({"from": f, "to": t, "body": "text"}, "body a string"),
        ({"from": f, "to": t, "body": [1, 2]}, "body a list"),
        ({"from": f, "to": t, "body": None}, "body null"),
        ({"from": f, "to": 5, "body": {}}, "to a number"),
        ({"from": ["a"], "to": t, "body": {}}, "from a list"),
        ({"from": f, "broadcast": "yes", "body": {}}, "broadcast a string"),
        ({"from": f, "to": t, "channel": 1, "body": {}}, "channel a number"),
        ({"from": f, "to": t, "id": 5, "body": {}}, "id a number"),
    ]
    for obj, what in v1_cases:
        expect_error(http.post("/v1/messages", json=obj), 400, "POST /v1/messages with %s" % what)
    log("POST /v1/messages: %d wrong/missing fields -> 400" % len(v1_cases))

    ack_cases = [({}, "seq missing"), ({"seq": "3"}, "seq a string"), ({"seq": -1}, "seq negative"),
                 ({"seq": 1.5}, "seq a fraction"), ({"seq": None}, "seq null")]
    for obj, what in ack_cases:
        expect_error(http.post("/v1/agents/%s/ack" % SINK, json=obj), 400,
                     "POST /v1/agents/{n}/ack with %s" % what)
    log("POST /v1/agents/{n}/ack: %d bad bodies -> 400" % len(ack_cases))


# ── 5. names ──────────────────────────────────────────────────────────────

BAD_NAMES = ["bad name", "x" * 129, "", "ümlaut", "a/b", "semi;colon", "new\nline"]


def test_bad_names(http):
    ok = SENDER
    n = 0
    for bad in BAD_NAMES:
        label = repr(bad if len(bad) < 20 else bad[:10] + "...(%d chars)" % len(bad))

        def bad_req(resp, what):
            expect_error(resp, 400, "%s with the name %s" % (what, label), code="invalid_name")

        bad_req(http.post("/send", json={"from": bad, "to": SINK, "msg": "x"}), "POST /send from")
        bad_req(http.post("/send", json={"from": ok, "to": bad, "msg": "x"}), "POST /send to")
        bad_req(http.get("/recv", params={"to": bad}), "GET /recv to")
        bad_req(http.get("/poll", params={"agent": bad}), "GET /poll agent")
        bad_req(http.get("/subscribe", params={"agent": bad}), "GET /subscribe agent")
        bad_req(http.post("/broadcast", params={"from": bad}, json={"text": "x"}), "POST /broadcast from")
        bad_req(http.post("/v1/messages", json={"from": bad, "to": SINK, "body": {}}), "POST /v1/messages from")
        bad_req(http.post("/v1/messages", json={"from": ok, "to": bad, "body": {}}), "POST /v1/messages to")
        n += 8
        if bad:
            # an empty channel means the default one (as on the Unix socket)
            bad_req(http.post("/send", json={"from": ok, "to": SINK, "msg": "x", "channel": bad}),
                    "POST /send channel")
            bad_req(http.get("/recv", params={"to": ok, "channel": bad}), "GET /recv channel")
            bad_req(http.get("/status", params={"channel": bad}), "GET /status channel")
            bad_req(http.post("/v1/messages", json={"from": ok, "to": SINK, "channel": bad, "body": {}}),
                    "POST /v1/messages channel")
            bad_req(http.get("/v1/agents/%s/inbox" % SINK, params={"channel": bad}),
                    "GET v1 inbox channel")
            bad_req(http.post("/broadcast", params={"from": ok, "channel": bad}, json={"text": "x"}),
                    "POST /broadcast channel")
            n += 6
        if bad and "/" not in bad:
            quoted = urllib.parse.quote(bad, safe="")
            bad_req(http.get("/v1/agents/%s/inbox" % quoted), "GET /v1/agents/{name}/inbox")
            bad_req(http.post("/v1/agents/%s/ack" % quoted, json={"seq": 1}), "POST /v1/agents/{name}/ack")
            bad_req(http.get("/v1/agents/%s/stream" % quoted), "GET /v1/agents/{name}/stream")
            n += 3
    # 128 characters is fine
    long_ok = "n" * 128
    r = expect_json(http.post("/send", json={"from": long_ok, "to": long_ok, "msg": "128"}), 200,
                    "POST /send with 128-char names")
    got = expect_json(http.get("/recv", params={"to": long_ok, "since": "0"}), 200, "GET /recv 128")
    check([m.get("seq") for m in got.get("messages", [])][-1:] == [r.get("seq")],
          "the message between 128-char names did not arrive: %r" % got)
    allowed = "Az09._:@-" + unique_name("x")
    expect_json(http.post("/send", json={"from": allowed, "to": allowed, "msg": "chars"}), 200,
                "POST /send with every allowed character class")
    log("bad names: %d requests -> 400 invalid_name; 128 chars and [A-Za-z0-9._:@-] accepted" % n)


# ── 6. routes and query parameters ────────────────────────────────────────

def test_routes(http):
    for method, path in (("GET", "/nope"), ("POST", "/nope"), ("GET", "/v1/nope"),
                         ("GET", "/v1/agents/%s/nope" % SINK), ("GET", "/send/extra"),
                         ("GET", "/v2/messages")):
        expect_error(http.request(method, path), 404, "%s %s" % (method, path), code="not_found")
    log("unknown routes: 404 JSON not_found")

    for path, params, what in (
            ("/recv", {}, "/recv without to"),
            ("/recv", {"since": "0", "block": "false"}, "/recv with since but without to"),
            ("/recv", {"to": SINK, "block": "maybe"}, "/recv block=maybe"),
            ("/recv", {"to": SINK, "since": "yesterday"}, "/recv since=yesterday"),
            ("/recv", {"to": SINK, "max": "many"}, "/recv max=many"),
            ("/poll", {}, "/poll without agent"),
            ("/subscribe", {}, "/subscribe without agent"),
            ("/v1/agents/%s/inbox" % SINK, {"after": "x"}, "v1 inbox after=x"),
            ("/v1/agents/%s/inbox" % SINK, {"limit": "-1"}, "v1 inbox limit=-1"),
    ):
        expect_error(http.get(path, params=params), 400, "GET %s" % what)
    expect_error(http.post("/broadcast", json={"text": "x"}), 400, "POST /broadcast without from")
    log("missing or malformed query parameters: 400 JSON")


def test_wrong_method(http):
    """A known path with the wrong method is an error too, so JSON as well."""
    for method, path in (("GET", "/send"), ("POST", "/recv"), ("GET", "/broadcast"),
                         ("DELETE", "/v1/messages"), ("PUT", "/healthz")):
        resp = http.request(method, path)
        check(resp.status_code in (404, 405),
              "%s %s: expected 405 (or 404), got %s" % (method, path, httpbus.describe(resp)))
        expect_error(resp, resp.status_code, "%s %s (wrong method)" % (method, path))
    log("wrong methods: 405 with a JSON error")


def main():
    t0 = time.monotonic()
    with httpbus.client() as http:
        expect_json(http.get("/healthz"), 200, "GET /healthz")
        # the sink is known, so a broadcast that got through would land there
        expect_json(http.get("/recv", params={"to": SINK}), 200, "GET /recv (make the sink known)")
        expect_json(http.get("/recv", params={"to": SINK, "channel": "lim-ch"}), 200,
                    "GET /recv (sink on lim-ch)")
    test_too_large()
    with httpbus.client() as http:
        sink_is_empty(http, "after the oversized requests")
    test_under_limit()
    with httpbus.client() as http:
        test_broken_json(http)
        test_wrong_types(http)
        test_bad_names(http)
        test_routes(http)
        sink_is_empty(http, "after all rejected requests")
    with httpbus.client() as http:
        # still serving
        expect_json(http.get("/healthz"), 200, "GET /healthz at the end")
        me = unique_name("lim-end")
        r = expect_json(http.post("/send", json={"from": SENDER, "to": me, "msg": "still here ✓"}), 200,
                        "POST /send at the end")
        got = expect_json(http.get("/recv", params={"to": me, "since": "0"}), 200, "GET /recv at the end")
        check([(m.get("msg"), m.get("seq")) for m in got.get("messages", [])] == [("still here ✓", r["seq"])],
              "the final round trip failed: %r" % got)
    daemon_alive("Unix socket after the HTTP abuse")
    # connection handling after a 413, wrong methods and the 413 wording are
    # checked last, so a defect there does not hide the results above
    test_connection_after_413()
    with httpbus.client() as http:
        sink_is_empty(http, "after the raw 413")
        test_wrong_method(http)
    check_too_large_texts()
    log("http_limits done in %.1fs" % (time.monotonic() - t0))


if __name__ == "__main__":
    run(main)
