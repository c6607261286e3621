"""``hermod pub`` / ``hermod sub``: topic events from the command line.

Proves (binary from ``HERMOD_BIN``):

(a) ``hermod sub --socket S --count 2 'tui.**'`` running in the background
    prints exactly the first two matching events -- ``hermod pub --socket S
    tui.tool.start '{"tool":"bash"}'`` and (after a non-matching pub)
    ``echo '{"a":1}' | hermod pub --durable --socket S tui.tool.end`` -- one
    JSON message per line (topic, id, seq, stamped envelope body), and
    exits 0; the later ``hermod pub --url U tui.http '{}'`` is not printed.
(b) ``hermod pub`` prints its receipt JSON and exits 0: over the socket
    ``{"type":"published","id"}`` (plus ``seq``/``ts`` with ``--durable``),
    over ``--url`` ``{"id","seq":null,"ts":null}``; the ids are the ids of
    the delivered events.  A raw Unix subscriber of ``**`` sees all four
    publications (the non-matching one and the HTTP one included), in order.
(c) ``--from`` and ``--channel`` are honoured by ``pub`` and ``sub``.
(d) Errors: ``hermod pub --socket S 'bad..topic' '{}'`` (and over
    ``--url``) exits 1 with ``invalid_topic`` on stderr and prints nothing
    on stdout; ``hermod sub 'a..b'`` exits 1 with ``invalid_topic``; a
    non-object or non-JSON payload exits non-zero.
"""
import json
import os
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (RawConn, check, fail, is_float, is_int, log, run, socket_path,  # noqa: E402
                    unique_name)
from httpbus import base_url  # noqa: E402

CMD_TIMEOUT = 20.0
SUB_READY = 1.0


def hermod_bin():
    path = os.environ.get("HERMOD_BIN")
    if not path:
        fail("HERMOD_BIN is not set")
    deadline = time.monotonic() + 10
    while not os.path.exists(path):  # may be relinked under us
        if time.monotonic() >= deadline:
            fail("HERMOD_BIN %s does not exist" % path)
        time.sleep(0.2)
    return path


def cli_env():
    env = dict(os.environ)
    for var in ("AGENT_NAME", "AGENT_BUS_CHANNEL", "AGENT_BUS_URL", "HERMOD_HOME"):
        env.pop(var, None)
    return env


def hermod(args, stdin=None, expect_rc=0, what=None):
    what = what or "hermod " + " ".join(args)
    try:
        p = subprocess.run([hermod_bin()] + args, input=stdin, capture_output=True, text=True,
                           env=cli_env(), timeout=CMD_TIMEOUT,
                           stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        fail("%s: did not finish within %.0fs" % (what, CMD_TIMEOUT))
    if expect_rc is not None and p.returncode != expect_rc:
        fail("%s: exit status %d, expected %d (stdout %r, stderr %r)"
             % (what, p.returncode, expect_rc, p.stdout, p.stderr))
    return p


def receipt(p, what):
    lines = p.stdout.splitlines()
    check(len(lines) == 1, "%s: expected one receipt line on stdout, got %r" % (what, p.stdout))
    try:
        r = json.loads(lines[0])
    except ValueError:
        fail("%s: receipt is not JSON: %r" % (what, lines[0]))
    check(isinstance(r, dict) and isinstance(r.get("id"), str) and r["id"],
          "%s: receipt has no id: %r" % (what, r))
    return r


def unix_receipt(p, durable, what):
    r = receipt(p, what)
    check(r.get("type") == "published", "%s: receipt %r is not a 'published' frame" % (what, r))
    if durable:
        check(set(r) == {"type", "id", "seq", "ts"} and is_int(r["seq"]) and is_float(r["ts"]),
              "%s: durable receipt must carry seq and ts: %r" % (what, r))
    else:
        check(set(r) == {"type", "id"}, "%s: fast receipt must be {type, id}: %r" % (what, r))
    return r


class Sub:
    """``hermod sub`` in the background."""

    def __init__(self, args):
        self.args = args
        self.proc = subprocess.Popen([hermod_bin(), "sub"] + args, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True, env=cli_env())

    def wait_ready(self, timeout=10.0):
        """Until the process holds a socket (connected to the daemon), plus
        a moment for its subscribe round trip.  ``hermod sub`` prints
        nothing before the first event."""
        fd_dir = "/proc/%d/fd" % self.proc.pid
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                fail("hermod sub %s exited early with %d (stdout %r, stderr %r)"
                     % (" ".join(self.args), self.proc.returncode, out, err))
            try:
                if any(os.readlink(os.path.join(fd_dir, fd)).startswith("socket:")
                       for fd in os.listdir(fd_dir)):
                    break
            except OSError:
                pass
            if time.monotonic() >= deadline:
                self.kill()
                fail("hermod sub %s: no socket open after %.0fs" % (" ".join(self.args), timeout))
            time.sleep(0.02)
        time.sleep(SUB_READY)

    def finish(self, timeout=CMD_TIMEOUT):
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            fail("hermod sub %s did not exit within %.0fs (stdout so far %r, stderr %r)"
                 % (" ".join(self.args), timeout, out, err))
        return self.proc.returncode, out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def parse_lines(out, n, what):
    lines = out.splitlines()
    check(len(lines) == n, "%s: expected exactly %d lines, got %d: %r" % (what, n, len(lines), out))
    objs = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            fail("%s: line is not JSON: %r" % (what, line))
        check(isinstance(obj, dict), "%s: line is not an object: %r" % (what, line))
        objs.append(obj)
    return objs


def check_event(obj, topic, mid, extra, frm, channel, what):
    check(obj.get("type", "message") == "message", "%s: 'type' is %r" % (what, obj.get("type")))
    check(obj.get("topic") == topic, "%s: topic %r, expected %r (%r)" % (what, obj.get("topic"), topic, obj))
    check(obj.get("id") == mid, "%s: id %r, expected the receipt's %r" % (what, obj.get("id"), mid))
    check(obj.get("from") == frm, "%s: from %r, expected %r" % (what, obj.get("from"), frm))
    check(obj.get("channel") == channel, "%s: channel %r, expected %r" % (what, obj.get("channel"), channel))
    check(is_int(obj.get("seq")), "%s: seq %r" % (what, obj.get("seq")))
    body = obj.get("body")
    check(isinstance(body, dict), "%s: body %r" % (what, body))
    want_keys = set(extra) | {"type", "ts", "src"}
    check(set(body) == want_keys, "%s: body keys %r, expected %r" % (what, sorted(body), sorted(want_keys)))
    for k, v in extra.items():
        check(body[k] == v, "%s: body[%r] = %r, expected %r" % (what, k, body[k], v))
    check(body["type"] == topic and body["src"] == topic.split(".")[0] and is_float(body["ts"]),
          "%s: envelope stamps wrong: %r" % (what, body))


def main():
    sock = socket_path()
    url = base_url()
    subs = []
    try:
        with RawConn() as everything:
            r = everything.request({"type": "subscribe", "pattern": "**"}, what="subscribe **")
            check(r.get("type") == "subscribed", "raw subscribe **: %r" % r)

            sub = Sub(["--socket", sock, "--count", "2", "tui.**"])
            subs.append(sub)
            sub.wait_ready()

            p1 = unix_receipt(hermod(["pub", "--socket", sock, "tui.tool.start", '{"tool":"bash"}']),
                              False, "hermod pub --socket tui.tool.start")
            p2 = unix_receipt(hermod(["pub", "--socket", sock, "other.topic", '{"x":1}']),
                              False, "hermod pub --socket other.topic")
            p3 = unix_receipt(hermod(["pub", "--durable", "--socket", sock, "tui.tool.end"],
                                     stdin='{"a":1}\n'),
                              True, "echo '{\"a\":1}' | hermod pub --durable --socket tui.tool.end")
            w = "hermod pub --url tui.http"
            p4 = receipt(hermod(["pub", "--url", url, "tui.http", "{}"]), w)
            check(set(p4) == {"id", "seq", "ts"} and p4["seq"] is None and p4["ts"] is None,
                  "%s: receipt %r, expected {id, seq: null, ts: null}" % (w, p4))

            rc, out, err = sub.finish()
            what = "hermod sub --count 2 'tui.**'"
            check(rc == 0, "%s: exit status %d (stderr %r, stdout %r)" % (what, rc, err, out))
            lines = parse_lines(out, 2, what)
            check_event(lines[0], "tui.tool.start", p1["id"], {"tool": "bash"}, "anonymous",
                        "default", what + " line 1")
            check_event(lines[1], "tui.tool.end", p3["id"], {"a": 1}, "anonymous", "default",
                        what + " line 2")
            check(lines[1]["seq"] == p3["seq"], "%s: line 2 seq %r != durable receipt seq %r"
                  % (what, lines[1]["seq"], p3["seq"]))
            log("ok: hermod sub printed exactly the first two matching events and exited 0")

            # every publication reached the bus, in order
            want = [("tui.tool.start", p1["id"]), ("other.topic", p2["id"]),
                    ("tui.tool.end", p3["id"]), ("tui.http", p4["id"])]
            got = []
            deadline = time.monotonic() + 10
            while len(got) < len(want) and time.monotonic() < deadline:
                f = everything.recv_or_none(max(0.1, deadline - time.monotonic()))
                if f is not None:
                    got.append(f)
            got.extend(everything.collect(0.5))
            check([(f.get("topic"), f.get("id")) for f in got] == want,
                  "raw subscriber of **: got %r, expected exactly %r"
                  % ([(f.get("topic"), f.get("id")) for f in got], want))
            body = got[1].get("body")
            check(isinstance(body, dict) and body.get("x") == 1 and body.get("type") == "other.topic",
                  "other.topic body %r" % body)
            log("ok: hermod pub receipts match the published events (socket and --url)")

        # --from / --channel
        ch = unique_name("clich")
        frm = unique_name("cli-pub")
        sub = Sub(["--socket", sock, "--channel", ch, "--count", "1", "tui.*"])
        subs.append(sub)
        sub.wait_ready()
        hermod(["pub", "--socket", sock, "tui.default", "{}"])  # default channel: not for sub
        hermod(["pub", "--socket", sock, "--channel", ch, "tui.deep.er", "{}"])  # no match
        p5 = unix_receipt(hermod(["pub", "--socket", sock, "--from", frm, "--channel", ch,
                                  "tui.chan", '{"k":"v"}']), False, "hermod pub --channel")
        rc, out, err = sub.finish()
        what = "hermod sub --channel %s --count 1 'tui.*'" % ch
        check(rc == 0, "%s: exit status %d (stderr %r)" % (what, rc, err))
        lines = parse_lines(out, 1, what)
        check_event(lines[0], "tui.chan", p5["id"], {"k": "v"}, frm, ch, what)
        log("ok: --from and --channel")

        # errors
        for args in (["--socket", sock], ["--url", url]):
            what = "hermod pub %s 'bad..topic' '{}'" % args[0]
            p = hermod(["pub"] + args + ["bad..topic", "{}"], expect_rc=1, what=what)
            check("invalid_topic" in p.stderr, "%s: stderr %r does not name invalid_topic"
                  % (what, p.stderr))
            check(p.stdout == "", "%s: printed %r on stdout" % (what, p.stdout))
        what = "hermod sub --socket S 'a..b'"
        p = hermod(["sub", "--socket", sock, "a..b"], expect_rc=1, what=what)
        check("invalid_topic" in p.stderr, "%s: stderr %r does not name invalid_topic"
              % (what, p.stderr))
        for payload in ("[1,2]", "not json", '"text"'):
            what = "hermod pub --socket S x.y %r" % payload
            p = hermod(["pub", "--socket", sock, "x.y", payload], expect_rc=None, what=what)
            check(p.returncode != 0, "%s: exit status 0 (stdout %r)" % (what, p.stdout))
            check(p.stdout == "", "%s: printed %r on stdout" % (what, p.stdout))
        log("ok: invalid topics/patterns/payloads exit non-zero with a reason")
    finally:
        for s in subs:
            s.kill()


if __name__ == "__main__":
    run(main)
