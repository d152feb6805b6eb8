"""The sandbox mail provider: a local HTTP server that speaks the subset of Postmark's API we use.

It plays the part of a real provider so that the engine's promises can be measured at the provider
side: it enforces its own per-API-key cap per CALENDAR minute (on its own clock, optionally skewed),
counted when a request arrives, answers 429 past it, records every accepted send, and counts a
repeated idempotency key as a duplicate instead of a new send. It can add latency and inject faults.

    python -m sending.sandbox --port 8025 --cap demo-key=1200 --default-cap 600

In-process: `SandboxServer(port=0, caps={"k": 100}).start()`, then `.url`, `.report()`, `.stop()`.

HTTP: POST /email, POST /email/batch (Postmark's shapes, token in X-Postmark-Server-Token);
GET /_sandbox/report, POST /_sandbox/reset, POST /_sandbox/faults, POST /_sandbox/caps.
Standard library only, and quiet unless asked: `make run` may host it in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import socket
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

IDEMPOTENCY_HEADER = "x-emailops-idempotency-key"
IDEMPOTENCY_METADATA = "emailops_recipient_id"
MAX_BATCH = 500  # Postmark's batch limit
MAX_BODY_BYTES = 10 * 1024 * 1024
IDLE_TIMEOUT_S = 60  # keep-alive connections idle longer than this are closed

UNKNOWN_KEY_TEXT = (
    "The Server Token you provided in the X-Postmark-Server-Token request header was invalid. "
    "Please verify that you are using a valid token."
)


@dataclass(frozen=True)
class Send:
    """One accepted send, as the sandbox saw it arrive."""

    arrived_ms: int
    api_key: str
    to: str
    subject: str
    idempotency_key: str
    message_id: str
    duplicate: bool


@dataclass(frozen=True)
class Latency:
    """Lognormal answer delay; zero median means none."""

    median_ms: float = 0.0
    p99_ms: float = 0.0

    def sample_s(self) -> float:
        if self.median_ms <= 0:
            return 0.0
        if self.p99_ms <= self.median_ms:
            return self.median_ms / 1000
        sigma = math.log(self.p99_ms / self.median_ms) / 2.3263  # z of the 99th percentile
        return random.lognormvariate(math.log(self.median_ms), sigma) / 1000


@dataclass
class Fault:
    """Answer `status` instead of sending: to a `fraction` of requests, for `count` requests
    (None: unlimited) and/or until `until_ms` on the sandbox clock (None: no end)."""

    status: int
    fraction: float = 1.0
    count: int | None = None
    until_ms: int | None = None

    def active(self, now_ms: int) -> bool:
        if self.count is not None and self.count <= 0:
            return False
        return self.until_ms is None or now_ms < self.until_ms


class Answer(Exception):
    """An HTTP answer other than success, raised from inside request handling."""

    def __init__(self, status: int, body: dict, headers: dict | None = None):
        super().__init__(body.get("Message", ""))
        self.status = status
        self.body = body
        self.headers = headers or {}


def minute_key(ms: int) -> str:
    return datetime.fromtimestamp(ms // 60_000 * 60, tz=UTC).strftime("%Y-%m-%dT%H:%M")


class Ledger:
    """The sandbox's books: caps, what arrived when, duplicates. Every method is thread-safe."""

    def __init__(
        self,
        *,
        caps: dict[str, int | None] | None = None,
        default_cap: int | None = None,
        clock: Callable[[], int] | None = None,
        clock_offset_ms: int = 0,
        enforce: bool = True,
    ):
        self.caps = dict(caps or {})
        self.default_cap = default_cap
        self.clock_offset_ms = clock_offset_ms
        self.enforce = enforce
        self._clock = clock or (lambda: time.time_ns() // 1_000_000)
        self._lock = threading.Lock()
        self.faults: list[Fault] = []
        self._clear()

    def _clear(self) -> None:
        self.sends: list[Send] = []
        self._seen: set[tuple[str, str]] = set()
        # Per key and minute: requests the cap counts (duplicates too: the provider saw them),
        # new sends, requests refused by the cap.
        self._attempts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._accepted: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._new: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._throttled: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._duplicates: dict[str, int] = defaultdict(int)
        self._faulted: dict[int, int] = defaultdict(int)

    def now_ms(self) -> int:
        return self._clock() + self.clock_offset_ms

    def reset(self) -> None:
        with self._lock:
            self._clear()
            self.faults = []

    def set_caps(self, caps: dict[str, int | None]) -> None:
        with self._lock:
            self.caps.update(caps)

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def cap_for(self, api_key: str) -> int | None:
        """The key's cap (None: no cap). Raises Answer(401) for a key the sandbox does not know."""
        if api_key in self.caps:
            return self.caps[api_key]
        if api_key and self.default_cap is not None:
            return self.default_cap
        raise Answer(HTTPStatus.UNAUTHORIZED, {"ErrorCode": 10, "Message": UNKNOWN_KEY_TEXT})

    def admit(self, api_key: str, messages: list[dict]) -> list[dict]:
        """Count the request at arrival; record its messages or raise an Answer (fault, 429)."""
        with self._lock:
            now = self.now_ms()
            cap = self.cap_for(api_key)
            self._maybe_fault(now)
            minute = minute_key(now)
            attempts = self._attempts[api_key]
            if cap is not None and attempts[minute] + len(messages) > cap:
                attempts[minute] += len(messages)
                self._throttled[api_key][minute] += len(messages)
                if self.enforce:
                    raise self._too_many(now, cap)
            else:
                attempts[minute] += len(messages)
            self._accepted[api_key][minute] += len(messages)
            return [self._record(now, minute, api_key, m) for m in messages]

    def _maybe_fault(self, now: int) -> None:
        for fault in self.faults:
            if fault.active(now) and (fault.fraction >= 1 or random.random() < fault.fraction):
                if fault.count is not None:
                    fault.count -= 1
                self._faulted[fault.status] += 1
                raise Answer(
                    fault.status,
                    {"ErrorCode": fault.status, "Message": "Injected fault (sandbox)."},
                    {"Retry-After": "1"} if fault.status == HTTPStatus.TOO_MANY_REQUESTS else {},
                )

    def _too_many(self, now: int, cap: int) -> Answer:
        reset_ms = (now // 60_000 + 1) * 60_000
        headers = {
            "Retry-After": str(math.ceil((reset_ms - now) / 1000)),
            "X-RateLimit-Limit": str(cap),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(reset_ms // 1000),
        }
        body = {
            "ErrorCode": 429,
            "Message": f"Rate limit exceeded: at most {cap} messages per minute for this token.",
        }
        return Answer(HTTPStatus.TOO_MANY_REQUESTS, body, headers)

    def _record(self, now: int, minute: str, api_key: str, message: dict) -> dict:
        key = idempotency_key(message)
        duplicate = bool(key) and (api_key, key) in self._seen
        if duplicate:
            self._duplicates[api_key] += 1
        else:
            if key:
                self._seen.add((api_key, key))
            self._new[api_key][minute] += 1
        message_id = str(uuid.uuid4())
        to = str(message.get("To", ""))
        self.sends.append(
            Send(now, api_key, to, str(message.get("Subject", "")), key, message_id, duplicate)
        )
        submitted = datetime.fromtimestamp(now / 1000, tz=UTC).isoformat(timespec="milliseconds")
        return {
            "To": to,
            "SubmittedAt": submitted.replace("+00:00", "Z"),
            "MessageID": message_id,
            "ErrorCode": 0,
            "Message": "OK",
        }

    def rate_headers(self, api_key: str) -> dict:
        with self._lock:
            cap = self.caps.get(api_key, self.default_cap)
            if cap is None:
                return {}
            now = self.now_ms()
            used = self._attempts[api_key].get(minute_key(now), 0)
            return {
                "X-RateLimit-Limit": str(cap),
                "X-RateLimit-Remaining": str(max(cap - used, 0)),
                "X-RateLimit-Reset": str((now // 60_000 + 1) * 60),
            }

    def report(self) -> dict:
        with self._lock:
            over: dict[str, dict[str, int]] = {}
            for api_key, minutes in self._attempts.items():
                cap = self.caps.get(api_key, self.default_cap)
                if cap is None:
                    continue
                over_minutes = {m: n for m, n in sorted(minutes.items()) if n > cap}
                if over_minutes:
                    over[api_key] = over_minutes
            return {
                # New (first-time) sends per key and calendar minute.
                "per_minute": _plain(self._new),
                # Accepted requests per minute, duplicates included: what the cap counted.
                "accepted_per_minute": _plain(self._accepted),
                "duplicates": dict(self._duplicates),
                "total": {k: sum(m.values()) for k, m in self._new.items()},
                # Minutes in which more was attempted than the cap allows (refused or not).
                "over_cap_minutes": over,
                "throttled": _plain(self._throttled),
                "faults": {str(status): n for status, n in self._faulted.items()},
                "caps": dict(self.caps),
                "default_cap": self.default_cap,
                "clock_offset_ms": self.clock_offset_ms,
            }


def _plain(nested: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {k: dict(sorted(v.items())) for k, v in nested.items() if v}


def idempotency_key(message: dict) -> str:
    headers = message.get("Headers") or []
    if isinstance(headers, list):
        for header in headers:
            if isinstance(header, dict) and str(header.get("Name", "")).lower() == (
                IDEMPOTENCY_HEADER
            ):
                return str(header.get("Value", ""))
    metadata = message.get("Metadata")
    if isinstance(metadata, dict) and metadata.get(IDEMPOTENCY_METADATA) is not None:
        return str(metadata[IDEMPOTENCY_METADATA])
    return ""


def _check_message(message) -> None:
    if not isinstance(message, dict):
        raise Answer(422, {"ErrorCode": 403, "Message": "Each message must be a JSON object."})
    for field in ("From", "To"):
        if not message.get(field):
            raise Answer(
                422, {"ErrorCode": 300, "Message": f"Invalid email request: '{field}' is required."}
            )


def _caps(body) -> dict[str, int | None]:
    if not isinstance(body, dict) or not all(
        cap is None or (isinstance(cap, int) and cap >= 1) for cap in body.values()
    ):
        raise ValueError("expected {api_key: cap ≥ 1 or null, ...}")
    return body


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a sending thread reuses its connection
    server_version = "EmailOpsSandbox/1"
    timeout = IDLE_TIMEOUT_S
    disable_nagle_algorithm = True  # else small answers wait on delayed ACKs (~40 ms each)
    server: _HTTPServer

    def setup(self):
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def log_message(self, format, *args):
        if self.server.sandbox.verbose:
            super().log_message(format, *args)

    def do_GET(self):
        if self.path.split("?")[0] == "/_sandbox/report":
            self._reply(200, self.server.sandbox.report())
        else:
            self._reply(404, {"ErrorCode": 404, "Message": f"No such endpoint: {self.path}"})

    def do_POST(self):
        try:
            body = self._body()
            path = self.path.split("?")[0].rstrip("/")
            if path == "/email":
                self._send([body], batch=False)
            elif path == "/email/batch":
                self._send(body, batch=True)
            elif path == "/_sandbox/reset":
                self.server.sandbox.reset()
                self._reply(200, {"Message": "OK"})
            elif path == "/_sandbox/faults":
                self._control(lambda: self.server.sandbox.inject_fault(**(body or {})))
            elif path == "/_sandbox/caps":
                self._control(lambda: self.server.sandbox.ledger.set_caps(_caps(body)))
            else:
                raise Answer(404, {"ErrorCode": 404, "Message": f"No such endpoint: {self.path}"})
        except Answer as answer:
            self._reply(answer.status, answer.body, answer.headers)

    def _control(self, change: Callable[[], object]) -> None:
        try:
            change()
        except (TypeError, ValueError) as exc:
            raise Answer(
                400, {"ErrorCode": 400, "Message": f"Bad control request: {exc}"}
            ) from None
        self._reply(200, {"Message": "OK"})

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise Answer(413, {"ErrorCode": 413, "Message": "Request too large."})
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise Answer(
                400, {"ErrorCode": 402, "Message": "Received invalid JSON input."}
            ) from None

    def _send(self, messages, *, batch: bool):
        sandbox = self.server.sandbox
        api_key = self.headers.get("X-Postmark-Server-Token", "")
        sandbox.ledger.cap_for(api_key)  # 401 before looking at the body, like Postmark
        if not isinstance(messages, list) or not messages or len(messages) > MAX_BATCH:
            raise Answer(
                422, {"ErrorCode": 410, "Message": f"A batch holds 1 to {MAX_BATCH} messages."}
            )
        for message in messages:
            _check_message(message)
        results = sandbox.ledger.admit(api_key, messages)
        delay = sandbox.latency.sample_s()
        if delay:
            time.sleep(delay)
        self._reply(200, results if batch else results[0], sandbox.ledger.rate_headers(api_key))

    def _reply(self, status: int, body, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        # Head and body in one write: one packet for a small answer.
        self._headers_buffer.append(b"\r\n" + data)
        self.flush_headers()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many workers connecting at once

    def __init__(self, address, sandbox: SandboxServer):
        self.sandbox = sandbox
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.connections_opened = 0
        super().__init__(address, Handler)

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
                self.connections_opened += 1
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)


class SandboxServer:
    """The sandbox, served from a background thread (`start`) or in the foreground."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        caps: dict[str, int | None] | None = None,
        default_cap: int | None = None,
        clock_offset_ms: int = 0,
        clock: Callable[[], int] | None = None,
        latency: Latency | None = None,
        enforce: bool = True,
        verbose: bool = False,
    ):
        self.host = host
        self.requested_port = port
        self.ledger = Ledger(
            caps=caps,
            default_cap=default_cap,
            clock=clock,
            clock_offset_ms=clock_offset_ms,
            enforce=enforce,
        )
        self.latency = latency or Latency()
        self.verbose = verbose
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the sandbox is not listening: call start()")
        return self._httpd.server_address[1]

    @property
    def connections_opened(self) -> int:
        """TCP connections accepted since start: keep-alive reuse keeps this small."""
        return self._httpd.connections_opened if self._httpd else 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def bind(self) -> None:
        if self._httpd is None:
            self._httpd = _HTTPServer((self.host, self.requested_port), self)

    def start(self) -> SandboxServer:
        self.bind()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"sandbox:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.bind()
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._close()

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._close()

    def _close(self) -> None:
        if self._httpd is not None:
            self._httpd.close_connections()
            self._httpd.server_close()
            self._httpd = None

    # The books.

    @property
    def sends(self) -> list[Send]:
        with self.ledger._lock:
            return list(self.ledger.sends)

    def report(self) -> dict:
        return self.ledger.report()

    def reset(self) -> None:
        self.ledger.reset()

    def inject_fault(
        self,
        status: int = 500,
        *,
        fraction: float = 1.0,
        count: int | None = None,
        duration_ms: int | None = None,
    ) -> Fault:
        """Answer `status` to a fraction of requests, `count` times and/or for `duration_ms`."""
        if status not in (429, 500, 502, 503):
            raise ValueError("a fault answers 429, 500, 502 or 503")
        until = None if duration_ms is None else self.ledger.now_ms() + duration_ms
        fault = Fault(status=status, fraction=fraction, count=count, until_ms=until)
        self.ledger.add_fault(fault)
        return fault


def _cap_arg(value: str) -> tuple[str, int]:
    key, sep, cap = value.partition("=")
    if not key or not sep or not cap.isdigit() or int(cap) < 1:
        raise argparse.ArgumentTypeError(f"expected KEY=N with N ≥ 1, got {value!r}")
    return key, int(cap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sending.sandbox",
        description="A local mail provider speaking Postmark's API, with per-minute caps.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument(
        "--cap", type=_cap_arg, action="append", default=[], metavar="KEY=N",
        help="an API key and its cap per calendar minute (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--default-cap", type=int, default=None, metavar="N",
        help="accept any other key, with this cap (default: unknown keys get 401)",
    )  # fmt: skip
    parser.add_argument("--clock-offset-ms", type=int, default=0, help="skew the sandbox clock")
    parser.add_argument("--latency-median-ms", type=float, default=0.0)
    parser.add_argument("--latency-p99-ms", type=float, default=0.0)
    parser.add_argument(
        "--fault", action="append", default=[], metavar="STATUS:FRACTION",
        help="answer STATUS (429, 500, 502, 503) to this fraction of requests, e.g. 500:0.01",
    )  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    if not args.cap and args.default_cap is None:
        parser.error("give at least one --cap KEY=N or a --default-cap N")

    server = SandboxServer(
        args.host,
        args.port,
        caps=dict(args.cap),
        default_cap=args.default_cap,
        clock_offset_ms=args.clock_offset_ms,
        latency=Latency(args.latency_median_ms, args.latency_p99_ms),
        verbose=args.verbose,
    )
    for spec in args.fault:
        status, _, fraction = spec.partition(":")
        server.inject_fault(int(status), fraction=float(fraction or 1))
    server.bind()
    caps = ", ".join(f"{k}={v}/min" for k, v in args.cap) or "none"
    print(
        f"sandbox listening on {server.url} (caps: {caps}; default cap: {args.default_cap}); "
        f"report at {server.url}_sandbox/report",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    print(json.dumps({"report": server.report()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
