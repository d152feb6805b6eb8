"""AWS Lambda's Invoke API on 127.0.0.1, running the worker handler in a process of its own.

    python -m bench.lambda_local --port 9001 [--timeout-s 300]

The benchmarks' fleets point the production runtime (``WORKER_RUNTIME=lambda``, boto3) at it with
``AWS_ENDPOINT_URL_LAMBDA``: the conductor invokes workers exactly as it does on AWS (a signed
``Invoke`` with ``InvocationType=Event``, answered 202 with a request id), and the workers run
here, each in a thread with Lambda's context (a deadline ``--timeout-s`` away), instead of inside
the Celery processes whose conductor they would otherwise compete with for one GIL. On AWS they
run on machines of their own; here they share the machine but not the conductor's process, and
their CPU is this process's.

Only what the runtime uses is served: ``POST /2015-03-31/functions/{name}/invocations`` with
``X-Amz-Invocation-Type: Event`` (anything else is answered 400, as a misuse should be seen), and
``GET /_lambda/stats`` (invocations, running, finished, failed) for the bench.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INVOKE = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations$")
log = logging.getLogger("bench.lambda_local")


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = {"invocations": 0, "running": 0, "finished": 0, "failed": 0}

    def add(self, **changes: int) -> None:
        with self.lock:
            for key, change in changes.items():
                self.counts[key] += change

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.counts)


def run_invocation(event: dict, request_id: str, timeout_s: float, stats: Stats) -> None:
    from sending import worker

    context = worker.LocalContext(timeout_s, aws_request_id=request_id)
    try:
        worker.handler(event, context)
    except Exception:
        log.exception("invocation %s failed", request_id)
        stats.add(running=-1, failed=1)
    else:
        stats.add(running=-1, finished=1)


def make_handler(*, timeout_s: float, stats: Stats):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            pass

        def _answer(self, status: int, body: dict | None = None, headers: dict | None = None):
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/_lambda/stats":
                self._answer(200, stats.snapshot())
            else:
                self._answer(404, {"message": f"no route {self.path}"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not INVOKE.match(self.path):
                self._answer(404, {"message": f"no route {self.path}"})
                return
            kind = self.headers.get("X-Amz-Invocation-Type", "RequestResponse")
            if kind != "Event":
                self._answer(400, {"message": f"only Event invocations here, not {kind}"})
                return
            try:
                event = json.loads(body)
            except ValueError:
                self._answer(400, {"message": "the payload is not JSON"})
                return
            request_id = str(uuid.uuid4())
            stats.add(invocations=1, running=1)
            threading.Thread(
                target=run_invocation,
                args=(event, request_id, timeout_s, stats),
                name=f"invocation-{event.get('worker_id')}",
                daemon=True,
            ).start()
            self._answer(202, None, {"x-amzn-RequestId": request_id})

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="each invocation's deadline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from sending.worker import ensure_django

    ensure_django()
    stats = Stats()
    server = ThreadingHTTPServer(
        ("127.0.0.1", args.port), make_handler(timeout_s=args.timeout_s, stats=stats)
    )
    server.daemon_threads = True
    print(f"lambda_local: listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
