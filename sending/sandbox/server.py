"""The sandbox's HTTP server: Postmark's /email and /email/batch, and its control endpoints
(/_sandbox/report, sends, reset, faults, caps, late), served from a thread or in the foreground."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .books import ErrorAnswer, Fault, LateAnswer, Latency, Ledger, Send

MAX_BATCH = 500  # Postmark's batch limit
MAX_BODY_BYTES = 10 * 1024 * 1024
IDLE_TIMEOUT_S = 60  # keep-alive connections idle longer than this are closed


def _check_message(message) -> None:
    if not isinstance(message, dict):
        raise ErrorAnswer(422, {"ErrorCode": 403, "Message": "Each message must be a JSON object."})
    for field in ("From", "To"):
        if not message.get(field):
            raise ErrorAnswer(
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
        path = self.path.split("?")[0]
        if path == "/_sandbox/report":
            self._reply(200, self.server.sandbox.report())
        elif path == "/_sandbox/sends":
            # Every accepted send (arrival on the sandbox clock, key, To, idempotency key): what
            # a benchmark checks the database against.
            sends = self.server.sandbox.sends
            self._reply(200, [[s.arrived_ms, s.api_key, s.to, s.idempotency_key] for s in sends])
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
            elif path == "/_sandbox/late":
                self._control(lambda: self.server.sandbox.set_late(**(body or {})))
            elif path == "/_sandbox/caps":
                self._control(lambda: self.server.sandbox.ledger.set_caps(_caps(body)))
            else:
                raise ErrorAnswer(
                    404, {"ErrorCode": 404, "Message": f"No such endpoint: {self.path}"}
                )
        except ErrorAnswer as answer:
            self._reply(answer.status, answer.body, answer.headers)

    def _control(self, change: Callable[[], object]) -> None:
        try:
            change()
        except (TypeError, ValueError) as exc:
            raise ErrorAnswer(
                400, {"ErrorCode": 400, "Message": f"Bad control request: {exc}"}
            ) from None
        self._reply(200, {"Message": "OK"})

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ErrorAnswer(413, {"ErrorCode": 413, "Message": "Request too large."})
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ErrorAnswer(
                400, {"ErrorCode": 402, "Message": "Received invalid JSON input."}
            ) from None

    def _send(self, messages, *, batch: bool):
        sandbox = self.server.sandbox
        api_key = self.headers.get("X-Postmark-Server-Token", "")
        sandbox.ledger.cap_for(api_key)  # 401 before looking at the body, like Postmark
        if not isinstance(messages, list) or not messages or len(messages) > MAX_BATCH:
            raise ErrorAnswer(
                422, {"ErrorCode": 410, "Message": f"A batch holds 1 to {MAX_BATCH} messages."}
            )
        for message in messages:
            _check_message(message)
        results = sandbox.ledger.admit(api_key, messages)
        delay = sandbox.latency.sample_s()
        held = sandbox.late.hold_s()
        if held:
            sandbox.ledger.note_late(api_key, len(messages))
        if delay or held:
            time.sleep(max(delay, held))
        headers = sandbox.ledger.rate_headers(api_key)
        # A client that gave up waiting for a held answer has closed its end: nothing to tell it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._reply(200, results if batch else results[0], headers)

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
        speed: float = 1,
        latency: Latency | None = None,
        late: LateAnswer | None = None,
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
            speed=speed,
            enforce=enforce,
        )
        self.latency = latency or Latency()
        self.late = late or LateAnswer()
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
        return self.ledger.sends_so_far()

    def report(self) -> dict:
        return self.ledger.report()

    def reset(self) -> None:
        self.ledger.reset()
        self.late = LateAnswer()

    def set_late(self, fraction: float = 0.0, delay_ms: int = 0) -> LateAnswer:
        """Hold the answer to this fraction of accepted requests for delay_ms (0: off)."""
        self.late = LateAnswer(fraction=fraction, delay_ms=delay_ms)
        return self.late

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
