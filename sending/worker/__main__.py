"""`python -m sending.worker`: run the handler in this process, under a Lambda-like deadline."""

import argparse
import json
import logging
import os
import sys
import threading

from . import handler
from .environment import DEFAULTS, LocalContext

log = logging.getLogger("sending.worker")


def _timed_out(timeout_s: float) -> None:
    # What Lambda does at its timeout: the process ends, whatever it was doing.
    log.error("worker process: timeout of %.1f s reached; exiting", timeout_s)
    logging.shutdown()
    os._exit(124)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sending.worker", description="Run the worker handler in this process."
    )
    parser.add_argument(
        "--event", required=True, help="the invocation event as JSON, or - to read it from stdin"
    )
    parser.add_argument("--timeout-s", type=float, default=None, help="like Lambda's timeout")
    parser.add_argument("--request-id", default=None, help="the invocation's id")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # Like Lambda's, the clock starts before the process has loaded anything.
    timeout_s = args.timeout_s or float(
        os.environ.get("LOCAL_WORKER_TIMEOUT_S", DEFAULTS["LOCAL_WORKER_TIMEOUT_S"])
    )
    context = LocalContext(timeout_s, aws_request_id=args.request_id)
    event = json.loads(sys.stdin.read() if args.event == "-" else args.event)
    watchdog = threading.Timer(timeout_s, _timed_out, args=(timeout_s,))
    watchdog.daemon = True
    watchdog.start()
    try:
        summary = handler(event, context)
    finally:
        watchdog.cancel()
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
