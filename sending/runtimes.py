"""How workers are invoked: on this machine (local) or on AWS Lambda, chosen by WORKER_RUNTIME.

Either way the same handler runs (sending/worker/) with the same event, and `invoke` returns at
once with a request id: the worker reports through the worker API, never to its caller.

    runtime = get_runtime()
    worker, token = checkin.worker_start(customer_id=..., runtime=runtime.name)
    runtime.invoke(api_url=worker_api_url(), token=token, worker_id=worker.pk)

Settings (read at call time): WORKER_RUNTIME ("local" | "lambda"), LOCAL_WORKER_MODE ("thread" |
"process"), LOCAL_WORKER_TIMEOUT_S, LAMBDA_FUNCTION_NAME, AWS_REGION, WORKER_API_URL.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from . import worker as worker_module

log = logging.getLogger(__name__)

KEEP_FINISHED = 100  # finished local invocations kept for inspection
PROJECT_DIR = Path(__file__).resolve().parent.parent


def worker_api_url() -> str:
    """Where workers reach the worker API (WORKER_API_URL)."""
    return settings.WORKER_API_URL


def get_runtime() -> Runtime:
    kind = settings.WORKER_RUNTIME
    if kind == "local":
        return LocalRuntime(
            mode=settings.LOCAL_WORKER_MODE, timeout_s=float(settings.LOCAL_WORKER_TIMEOUT_S)
        )
    if kind == "lambda":
        return LambdaRuntime(
            function_name=settings.LAMBDA_FUNCTION_NAME, region=settings.AWS_REGION or None
        )
    raise ImproperlyConfigured(f"WORKER_RUNTIME must be 'local' or 'lambda', not {kind!r}")


class Runtime:
    name = ""

    def invoke(self, *, api_url: str, token: str, worker_id: int) -> str:
        """Start one worker invocation; return its request id."""
        raise NotImplementedError


def _event(api_url: str, token: str, worker_id: int) -> dict:
    return {"api_url": api_url, "token": token, "worker_id": worker_id}


# --- local ------------------------------------------------------------------------------------


@dataclass
class LocalInvocation:
    """One local worker: a daemon thread of this process, or a child process."""

    request_id: str
    worker_id: int
    mode: str
    started_at: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None
    process: subprocess.Popen | None = None
    result: dict | None = None  # the handler's summary, once it has returned
    error: BaseException | None = None
    _reader: threading.Thread | None = None

    def is_alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.thread is not None and self.thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until it ends; True if it has."""
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            if self._reader is not None:
                self._reader.join(5)
            return True
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.is_alive()

    def terminate(self, grace_s: float = 2.0) -> bool:
        """End a process-mode worker (SIGTERM, then SIGKILL). A thread cannot be stopped."""
        if self.process is None:
            return not self.is_alive()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(grace_s)
        return True

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode


_invocations: dict[str, LocalInvocation] = {}
_invocations_lock = threading.Lock()


def local_invocations() -> list[LocalInvocation]:
    with _invocations_lock:
        return list(_invocations.values())


def local_invocation(request_id: str) -> LocalInvocation:
    with _invocations_lock:
        return _invocations[request_id]


def shutdown_local_workers(timeout_s: float = 5.0) -> bool:
    """Terminate local worker processes and wait for threads; True if all have ended."""
    deadline = time.monotonic() + timeout_s
    ended = True
    for invocation in local_invocations():
        invocation.terminate()
        ended &= invocation.join(max(0.0, deadline - time.monotonic()))
    return ended


def _remember(invocation: LocalInvocation) -> None:
    with _invocations_lock:
        finished = [k for k, v in _invocations.items() if not v.is_alive()]
        for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del _invocations[key]
        _invocations[invocation.request_id] = invocation


class LocalRuntime(Runtime):
    """Runs the handler here under a LocalContext whose remaining time counts down from
    `timeout_s`, so the deadline logic runs as on Lambda. Mode "thread" (`make run`) or
    "process" (`python -m sending.worker`, which a test can kill mid-batch)."""

    name = "local"
    MODES = ("thread", "process")

    def __init__(self, *, mode: str = "thread", timeout_s: float = 60.0):
        if mode not in self.MODES:
            raise ImproperlyConfigured(f"LOCAL_WORKER_MODE must be thread or process, not {mode!r}")
        self.mode = mode
        self.timeout_s = timeout_s

    def invoke(self, *, api_url: str, token: str, worker_id: int) -> str:
        request_id = f"local-{uuid.uuid4().hex}"
        invocation = LocalInvocation(request_id=request_id, worker_id=worker_id, mode=self.mode)
        event = _event(api_url, token, worker_id)
        if self.mode == "thread":
            self._start_thread(invocation, event)
        else:
            self._start_process(invocation, event)
        _remember(invocation)
        log.info("local worker %s invoked (%s, %s)", worker_id, self.mode, request_id)
        return request_id

    def _start_thread(self, invocation: LocalInvocation, event: dict) -> None:
        context = worker_module.LocalContext(self.timeout_s, aws_request_id=invocation.request_id)

        def run():
            try:
                invocation.result = worker_module.handler(event, context)
            except Exception as exc:
                log.exception("local worker %s failed", invocation.worker_id)
                invocation.error = exc

        invocation.thread = threading.Thread(
            target=run, name=f"worker-{invocation.worker_id}", daemon=True
        )
        invocation.thread.start()

    @staticmethod
    def _child_env() -> dict:
        """The worker process runs on minimal settings: pass it this process's worker knobs."""
        env = dict(os.environ)
        for name in worker_module.DEFAULTS:
            value = getattr(settings, name, None)
            if value is not None:
                env[name] = str(value)
        return env

    def _start_process(self, invocation: LocalInvocation, event: dict) -> None:
        # The event (with its token) goes through stdin, not the command line other users see.
        command = [
            sys.executable,
            "-m",
            "sending.worker",
            "--event",
            "-",
            "--timeout-s",
            str(self.timeout_s),
            "--request-id",
            invocation.request_id,
        ]
        process = subprocess.Popen(
            command,
            cwd=PROJECT_DIR,
            env=self._child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        process.stdin.write(json.dumps(event))
        process.stdin.close()
        invocation.process = process

        def collect():
            # The summary is the last line the worker prints on stdout (logs go to stderr).
            lines = process.stdout.read().splitlines()
            process.stdout.close()
            if lines:
                try:
                    invocation.result = json.loads(lines[-1])
                except ValueError:
                    log.error("local worker %s printed: %s", invocation.worker_id, lines[-1])

        invocation._reader = threading.Thread(target=collect, daemon=True)
        invocation._reader.start()


# --- AWS Lambda -------------------------------------------------------------------------------


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _lambda_client(region: str | None):
    """One boto3 Lambda client per region (and endpoint) per process, built once: a client costs
    tens of milliseconds of CPU to build, and a conductor round that starts workers for twenty
    customers built twenty (bench.schedule). Clients are thread-safe once built; building them is
    not, from boto3's default session, so each is built from a session of its own, under a lock."""
    key = (region, os.environ.get("AWS_ENDPOINT_URL_LAMBDA"), os.environ.get("AWS_ENDPOINT_URL"))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3

            client = boto3.session.Session(region_name=region).client("lambda")
            _clients[key] = client
        return client


class LambdaRuntime(Runtime):
    """Asynchronous ("Event") invocations of the worker function; boto3 is built on first use."""

    name = "lambda"

    def __init__(self, *, function_name: str, region: str | None = None, client=None):
        if not function_name:
            raise ImproperlyConfigured(
                "LAMBDA_FUNCTION_NAME must be set when WORKER_RUNTIME=lambda"
            )
        self.function_name = function_name
        self.region = region
        self._client = client

    @property
    def client(self):
        if self._client is None:
            self._client = _lambda_client(self.region)
        return self._client

    def invoke(self, *, api_url: str, token: str, worker_id: int) -> str:
        response = self.client.invoke(
            FunctionName=self.function_name,
            InvocationType="Event",
            Payload=json.dumps(_event(api_url, token, worker_id)).encode(),
        )
        status = response.get("StatusCode")
        if status != 202:
            raise RuntimeError(f"Lambda did not queue worker {worker_id}: status {status}")
        request_id = response["ResponseMetadata"]["RequestId"]
        log.info("lambda worker %s invoked (%s)", worker_id, request_id)
        return request_id
