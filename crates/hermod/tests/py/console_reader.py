"""Reads one message as the real hermes-bus client: registers as $AGENT,
waits for a message whose text is $TEXT (registered delivery acknowledges
it: the console's badge moves to `read`), then disconnects."""
import os
import sys

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Inbox, log, new_client, run, stop_client  # noqa: E402


def main():
    agent, text = os.environ["AGENT"], os.environ["TEXT"]
    client = new_client(agent)
    try:
        inbox = Inbox(client)
        m = inbox.wait_message(
            lambda f: isinstance(f.get("body"), dict) and f["body"].get("text") == text,
            15, "the message %r" % text)
        log("console-reader", "read %s from %s" % (m.get("id"), m.get("from")))
        # The auto-ack follows the bytes being consumed: give it a moment.
        import time
        time.sleep(1.0)
    finally:
        stop_client(client)


run(main)
