"""Shared helpers for the hermod Python protocol tests.

Every test script is run as ``python script.py`` with ``HERMOD_SOCKET`` set to
the daemon's Unix socket.  Scripts call :func:`run` with their ``main``
function; any :class:`TestFailure`, ``AssertionError`` or unexpected exception
is printed to stderr and turns into exit status 1.

Helpers here:

* :func:`socket_path` -- the daemon socket from ``HERMOD_SOCKET``.
* :func:`unique_name` -- an endpoint name unique to this run.
* :class:`RawConn` -- a raw framed connection (4-byte big-endian length +
  UTF-8 JSON) with bounded reads.
* :func:`wait_for` -- poll a predicate until a deadline.
* :class:`Inbox` -- accumulates everything a ``BusClient`` receives.
* :func:`new_client` -- a connected ``hermes_bus.BusClient``.
"""
import json
import os
import socket
import struct
import sys
import time
import traceback
import uuid

import hermes_bus.client as hb_client
from hermes_bus.client import BusClient

# The real client tries to spawn ``hermes-busd`` (the Python daemon, on the
# HERMES_BUS_ROOT socket) whenever a connect fails.  In these tests that would
# only hide a dead hermod behind a stray process, so make it a no-op.  Both
# BusClient.connect and send_message look the function up in the module
# globals at call time, so patching the module attribute is enough.
hb_client._start_bus_server = lambda: None

MAX_FRAME = 10 * 1024 * 1024
DEFAULT_TIMEOUT = 5.0
POLL_INTERVAL = 0.02


class TestFailure(Exception):
    """A check failed; the message says which and why."""


def fail(reason):
    raise TestFailure(reason)


def check(cond, reason):
    if not cond:
        raise TestFailure(reason)


def log(*args):
    """Progress output goes to stdout so stderr is only the failure reason."""
    print(*args, flush=True)


def socket_path():
    path = os.environ.get("HERMOD_SOCKET")
    if not path:
        fail("HERMOD_SOCKET is not set")
    return path


def unique_name(prefix):
    """``prefix-<pid>-<random>``: only characters allowed in endpoint names."""
    return "%s-%d-%s" % (prefix, os.getpid(), uuid.uuid4().hex[:8])


def is_uuid(value):
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def body_of(msg):
    """The message body if it is an object, else {} (for filtering)."""
    body = msg.get("body")
    return body if isinstance(body, dict) else {}


def is_float(value):
    return isinstance(value, float)


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def wait_for(pred, timeout, what, interval=POLL_INTERVAL):
    """Call ``pred()`` until it returns something truthy; return that value.

    Fails with ``timed out after Ns waiting for <what>`` at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            fail("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def run(main):
    """Run ``main()``; exit 0 on success, print the reason and exit 1 on failure."""
    name = os.path.basename(sys.argv[0] or "test")
    try:
        main()
    except TestFailure as e:
        print("FAIL %s: %s" % (name, e), file=sys.stderr, flush=True)
        sys.exit(1)
    except AssertionError as e:
        traceback.print_exc(file=sys.stderr)
        print("FAIL %s: assertion failed: %s" % (name, e), file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - anything unexpected is a failure
        traceback.print_exc(file=sys.stderr)
        print("FAIL %s: unexpected %s: %s" % (name, type(e).__name__, e),
              file=sys.stderr, flush=True)
        sys.exit(1)
    log("PASS %s" % name)
    sys.stdout.flush()
    sys.exit(0)


# ── Raw framed connection ─────────────────────────────────────────────────

def encode_obj(obj):
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def frame(payload):
    """Length-prefix raw payload bytes."""
    return struct.pack(">I", len(payload)) + payload


class ConnectionClosed(Exception):
    pass


class RawConn:
    """One raw connection to the daemon with bounded, buffered reads."""

    def __init__(self, path=None, timeout=DEFAULT_TIMEOUT):
        self.path = path or socket_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.timeout = timeout
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as e:
            self.sock.close()
            fail("cannot connect to %s: %s" % (self.path, e))
        self.buf = b""
        self.pushed = []  # message frames set aside by recv_reply

    # sending
    def send_bytes(self, data):
        self.sock.settimeout(self.timeout)  # reads shorten it to their deadline
        self.sock.sendall(data)

    def send_payload(self, payload):
        self.send_bytes(frame(payload))

    def send_obj(self, obj):
        self.send_payload(encode_obj(obj))

    # receiving
    def _fill(self, n, deadline):
        """Read until ``self.buf`` holds ``n`` bytes.

        Returns False on timeout; raises ConnectionClosed on EOF/reset.
        """
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                # read no more than needed, so bytes the daemon sees consumed
                # are exactly the frames this test has looked at
                chunk = self.sock.recv(n - len(self.buf))
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as e:
                raise ConnectionClosed(str(e))
            if not chunk:
                raise ConnectionClosed("EOF")
            self.buf += chunk
        return True

    def recv_raw(self, timeout=DEFAULT_TIMEOUT, what="a frame"):
        """Return one frame's payload bytes (or fail)."""
        deadline = time.monotonic() + timeout
        try:
            if not self._fill(4, deadline):
                fail("timed out after %.1fs waiting for %s" % (timeout, what))
            (length,) = struct.unpack(">I", self.buf[:4])
            if length > MAX_FRAME:
                fail("daemon sent a frame of %d bytes (> 10 MiB) while waiting for %s"
                     % (length, what))
            if not self._fill(4 + length, deadline):
                fail("timed out after %.1fs reading the body of %s" % (timeout, what))
        except ConnectionClosed as e:
            fail("connection closed (%s) while waiting for %s" % (e, what))
        payload = self.buf[4:4 + length]
        self.buf = self.buf[4 + length:]
        return payload

    def recv_or_none(self, timeout):
        """One frame parsed as JSON, or None if nothing complete arrives in time."""
        if self.pushed:
            return self.pushed.pop(0)
        deadline = time.monotonic() + timeout
        try:
            if not self._fill(4, deadline):
                return None
        except ConnectionClosed as e:
            fail("connection closed (%s) while waiting for a frame" % e)
        return self.recv(max(1.0, deadline - time.monotonic()))

    def recv(self, timeout=DEFAULT_TIMEOUT, what="a frame"):
        """Return one frame parsed as a JSON object (or fail)."""
        if self.pushed:
            return self.pushed.pop(0)
        payload = self.recv_raw(timeout, what)
        try:
            obj = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            fail("daemon sent a frame that is not UTF-8 JSON (%s) while waiting for %s: %r"
                 % (e, what, payload[:200]))
        if not isinstance(obj, dict):
            fail("daemon sent a non-object frame while waiting for %s: %r" % (what, obj))
        return obj

    def recv_reply(self, timeout=DEFAULT_TIMEOUT, what="a reply"):
        """Next frame that is not a pushed ``message``.

        On a registered connection, deliveries (e.g. a broadcast from another
        test sharing the daemon) may arrive before a reply; they are kept in
        ``self.pushed`` and returned first by later ``recv`` calls.
        """
        deadline = time.monotonic() + timeout
        held = []
        try:
            while True:
                payload = self.recv_raw(max(0.0, deadline - time.monotonic()), what)
                try:
                    obj = json.loads(payload.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as e:
                    fail("daemon sent a frame that is not UTF-8 JSON (%s) while waiting for %s: %r"
                         % (e, what, payload[:200]))
                if not isinstance(obj, dict):
                    fail("daemon sent a non-object frame while waiting for %s: %r" % (what, obj))
                if obj.get("type") == "message":
                    held.append(obj)
                    continue
                return obj
        finally:
            self.pushed.extend(held)

    def collect(self, duration):
        """All frames that arrive within ``duration`` seconds."""
        deadline = time.monotonic() + duration
        frames = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return frames
            f = self.recv_or_none(remaining)
            if f is None:
                return frames
            frames.append(f)

    def recv_message(self, pred, timeout, what):
        """Next message frame matching ``pred``.

        Messages not matching are skipped: on a shared daemon another test may
        broadcast to every known agent.  Any non-message frame is a failure.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            f = self.recv_or_none(remaining) if remaining > 0 else None
            if f is None:
                fail("timed out after %.1fs waiting for %s" % (timeout, what))
            if f.get("type") != "message":
                fail("expected %s, got a non-message frame %r" % (what, f))
            if pred(f):
                return f

    def wait_closed(self, timeout=DEFAULT_TIMEOUT):
        """True once the daemon closed the connection (EOF or reset) within ``timeout``.

        Any frames that arrive first are discarded (use recv before this).
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
                return True
            if not chunk:
                return True

    # request helpers
    def request(self, obj, timeout=DEFAULT_TIMEOUT, what=None):
        self.send_obj(obj)
        return self.recv_reply(timeout, what or "reply to %s" % obj.get("type"))

    def expect_type(self, reply, typ, context):
        check(isinstance(reply, dict) and reply.get("type") == typ,
              "%s: expected a %r frame, got %r" % (context, typ, reply))
        return reply

    def expect_error(self, code, context, timeout=DEFAULT_TIMEOUT):
        reply = self.recv_reply(timeout, "error %r (%s)" % (code, context))
        check(reply.get("type") == "error",
              "%s: expected error %r, got %r" % (context, code, reply))
        check(reply.get("code") == code,
              "%s: expected error code %r, got %r" % (context, code, reply))
        check(isinstance(reply.get("detail"), str),
              "%s: error frame has no string 'detail': %r" % (context, reply))
        return reply

    def ping(self, context="ping", timeout=DEFAULT_TIMEOUT):
        reply = self.request({"type": "ping"}, timeout, "pong (%s)" % context)
        self.expect_type(reply, "pong", context)

    def register(self, endpoint, channel=None, context="register"):
        req = {"type": "register", "endpoint": endpoint}
        if channel is not None:
            req["channel"] = channel
        reply = self.request(req, what="registered (%s)" % context)
        self.expect_type(reply, "registered", context)
        check(reply.get("endpoint") == endpoint,
              "%s: registered reply names %r, expected %r" % (context, reply.get("endpoint"), endpoint))
        check(is_uuid(reply.get("session_id")),
              "%s: session_id is not a UUID: %r" % (context, reply.get("session_id")))
        return reply

    def send_durable(self, to, body, from_ep, msg_id=None, ts=None, context="send"):
        """Extension ``send``: returns (request, sent-reply) after checking the reply."""
        req = {
            "type": "send",
            "to": to,
            "from": from_ep,
            "id": msg_id or str(uuid.uuid4()),
            "ts": time.time() if ts is None else ts,
            "body": body,
        }
        reply = self.request(req, what="'sent' (%s)" % context)
        self.expect_type(reply, "sent", context)
        check(reply.get("id") == req["id"],
              "%s: 'sent' id %r != request id %r" % (context, reply.get("id"), req["id"]))
        check(is_int(reply.get("seq")), "%s: 'sent' seq is not an integer: %r" % (context, reply))
        check(is_float(reply.get("ts")), "%s: 'sent' ts is not a float: %r" % (context, reply))
        return req, reply

    def list_endpoints(self, context="list_endpoints"):
        reply = self.request({"type": "list_endpoints"}, what="endpoints_list (%s)" % context)
        self.expect_type(reply, "endpoints_list", context)
        eps = reply.get("endpoints")
        check(isinstance(eps, dict), "%s: 'endpoints' is not an object: %r" % (context, reply))
        return eps

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def list_endpoints(context="list_endpoints"):
    with RawConn() as c:
        return c.list_endpoints(context)


def daemon_alive(context):
    """A fresh connection still gets pong."""
    with RawConn() as c:
        c.ping(context)


# ── BusClient helpers ─────────────────────────────────────────────────────

def new_client(name):
    client = BusClient(name, socket_path=socket_path())
    if not client.connect():
        client.disconnect()
        fail("BusClient(%r).connect() returned False" % name)
    return client


def client_send(client, to, body, timeout=10.0):
    """``client.send`` returns False while the real client is between
    reconnects (it drops its socket after each 1 s idle read timeout); retry
    until it reports the frame written."""
    return wait_for(lambda: client.send(to, body), timeout,
                    "%s.send(%r) to return True" % (client.endpoint, to),
                    interval=0.01)


def stop_client(client, wait_offline=False):
    """Disconnect a BusClient for real.

    BusClient.disconnect() has a race: a reconnect thread that is inside
    _connect_and_register when disconnect() runs installs a fresh socket
    afterwards and nobody ever closes it, leaving a registered zombie
    connection.  Close such a socket explicitly, and optionally wait until
    the daemon no longer lists the endpoint.
    """
    client.disconnect()
    time.sleep(0.3)
    sock = client._sock
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
        client._sock = None
    if wait_offline:
        wait_for(lambda: client.endpoint not in list_endpoints("offline check"),
                 10.0, "%r to disappear from list_endpoints after disconnect" % client.endpoint,
                 interval=0.1)


class Inbox:
    """Everything a BusClient has received, in arrival order."""

    def __init__(self, client):
        self.client = client
        self.frames = []

    def pump(self):
        self.frames.extend(self.client.poll())
        return self.frames

    def messages(self, pred=None):
        self.pump()
        return [f for f in self.frames
                if f.get("type") == "message" and (pred is None or pred(f))]

    def wait_message(self, pred, timeout, what):
        """First message matching ``pred`` (checking ones already received too)."""
        def find():
            for m in self.messages(pred):
                return m
            return None
        return wait_for(find, timeout, what)

    def non_messages(self):
        self.pump()
        return [f for f in self.frames if f.get("type") != "message"]


def dedupe_in_order(values):
    """(first occurrences in arrival order, number of repeats)."""
    seen = set()
    out = []
    dups = 0
    for v in values:
        if v in seen:
            dups += 1
            continue
        seen.add(v)
        out.append(v)
    return out, dups


def describe_sequence_problem(got, expected):
    """Human-readable diff of two integer sequences (after dedupe)."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    parts = []
    if missing:
        parts.append("missing %d: %s" % (len(missing), _short(missing)))
    if extra:
        parts.append("unexpected %d: %s" % (len(extra), _short(extra)))
    if not missing and not extra:
        for i, (g, e) in enumerate(zip(got, expected)):
            if g != e:
                parts.append("out of order at position %d: got %r, expected %r; around: %r"
                             % (i, g, e, got[max(0, i - 3):i + 4]))
                break
    return "; ".join(parts) or "sequences equal"


def _short(seq, n=20):
    seq = list(seq)
    return repr(seq) if len(seq) <= n else repr(seq[:n])[:-1] + ", ...]"
