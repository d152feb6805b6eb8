"""The worker handler: the same code on AWS Lambda and in the local runtime.

A worker checks in (reporting its last batch), sends the batch it is given through the customer's
provider inside the window it is told, and repeats until told to stop or until its own time runs
short. It never reads the database: everything it needs comes in the check-in answer
(sending/openapi.yaml).

    handler(event, context)     the Lambda entry point; event = {api_url, token, worker_id}
    python -m sending.worker --event '<json>' [--timeout-s 60]

Timing. Windows are measured on this process's monotonic clock from the moment the answer arrived
(never on the wall clock). When an answer needed retries it may be a replay of an answer granted
seconds earlier, so the window's END and every `done_ms` are then measured from when the first
attempt was sent: later than the server meant is never allowed for a stop, and a `done_ms` that
is too large only charges a send to the next minute, never the other way.

Crash safety. Before each chunk of about a second of sending (never more than the grant's
`chunk_limit` recipients), the worker tells the API how far into the batch sends may have started
(`started_through`), so a worker that dies leaves at most one chunk in doubt; a send whose outcome
is not known (an unexpected error) is left out of the report, which makes it `unknown` on the
server: never re-sent automatically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urljoin

import requests

log = logging.getLogger(__name__)

# Settings (read at call time; on Lambda, where Django has no settings module, from the
# environment): name -> default.
DEFAULTS: dict[str, float | int] = {
    # Stop between batches when less than max(this, twice the last batch's duration) is left.
    "WORKER_DEADLINE_MARGIN_MS": 10_000,
    # Never start a send with less than this left (the send and the final check-in need it).
    "WORKER_SEND_MARGIN_MS": 3_000,
    # Each API call's timeout, and how often a network error or a 5xx is retried (same seq).
    "WORKER_API_TIMEOUT_S": 10,
    "WORKER_API_RETRIES": 4,
    "WORKER_API_BACKOFF_MS": 250,
    # Lambda's own limit; the local context counts down from this.
    "LOCAL_WORKER_TIMEOUT_S": 60,
}
CHUNK_S = 1.0  # about this much sending per progress call
SLOT_POLL_S = 0.05  # how often a sender waiting for a free slot re-checks the window


def ensure_django() -> None:
    """Django's template engine and email classes need settings. A worker needs no database and
    no apps, so unless this process already has settings (the local thread runtime) it gets
    minimal ones: fast to start, on Lambda and in a local worker process alike. Its own knobs
    come from the environment (see `setting`)."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        TIME_ZONE="UTC",
        USE_I18N=False,
        DEFAULT_CHARSET="utf-8",
        INSTALLED_APPS=[],
        LOGGING_CONFIG=None,
    )
    django.setup(set_prefix=False)
    # Lambda's root logger shows only warnings; a worker's batch lines are worth keeping.
    logging.getLogger(__package__ or "sending").setLevel(os.environ.get("LOG_LEVEL", "INFO"))


def setting(name: str):
    """A worker setting: Django's if set there, else the environment's, else the default."""
    from django.conf import settings

    default = DEFAULTS[name]
    value = getattr(settings, name, None)
    if value is None:
        value = os.environ.get(name)
    if value is None:
        return default
    return type(default)(value)


# --- the worker API ---------------------------------------------------------------------------


class ApiError(Exception):
    """The worker API refused a call (4xx): fatal for this worker, never retried."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class ApiUnavailable(ApiError):
    """Network errors or 5xx answers, still failing after every retry."""


class Api:
    """The worker API over HTTP, with the current token. Retries repeat the same request body."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        timeout_s: float,
        retries: int,
        backoff_ms: int,
        sleep: Callable[[float], None] = time.sleep,
        session: requests.Session | None = None,
    ):
        self.api_url = api_url if api_url.endswith("/") else api_url + "/"
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_ms = backoff_ms
        self.sleep = sleep
        self.session = session or requests.Session()
        self.last_attempts = 0

    def post(self, path: str, body: dict) -> dict | None:
        url = urljoin(self.api_url, path)
        problem = ""
        for attempt in range(self.retries + 1):
            self.last_attempts = attempt + 1
            if attempt:
                delay_s = self.backoff_ms * 2 ** (attempt - 1) / 1000
                log.warning("%s failed (%s); retry %d in %.2f s", path, problem, attempt, delay_s)
                self.sleep(delay_s)
            try:
                response = self.session.post(
                    url,
                    json=body,
                    headers={"Authorization": f"Bearer {self.token}"},
                    timeout=self.timeout_s,
                )
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code >= 500:
                problem = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise ApiError(
                    f"{path}: HTTP {response.status_code}: {response.text[:500]}",
                    status=response.status_code,
                )
            return response.json() if response.content else None
        raise ApiUnavailable(f"{path}: still failing after {self.retries + 1} attempts: {problem}")

    def close(self) -> None:
        self.session.close()


# --- timing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A batch's send window on the monotonic clock (seconds)."""

    origin: float  # when the answer arrived
    early_origin: float  # when the request (its first attempt) was sent
    start_at: float
    stop_at: float

    @classmethod
    def of(cls, batch: dict, *, received: float, first_sent: float, retried: bool) -> Window:
        """The server's offsets are relative to when it read its clock, somewhere between our
        first attempt and the answer's arrival (lock waits and a slow network included). Each end
        takes the anchor that errs on the safe side: the start from the arrival (never before the
        server meant), the end and the answer times from the first attempt (never after)."""
        return cls(
            origin=received,
            early_origin=first_sent,
            start_at=received + batch["start_in_ms"] / 1000,
            stop_at=first_sent + batch["stop_starting_in_ms"] / 1000,
        )

    def ms(self, at: float) -> int:
        """`at` as ms after the grant arrived, rounded up (a later done_ms is the safe side)."""
        return max(0, math.ceil((at - self.early_origin) * 1000))


@dataclass
class Answer:
    decision: str
    body: dict
    window: Window | None = None

    @property
    def batch(self) -> dict | None:
        return self.body.get("batch")


class LocalContext:
    """Lambda's context for local runs: a request id and a remaining time that counts down."""

    function_name = "emailops-local-worker"

    def __init__(self, timeout_s: float, *, aws_request_id: str | None = None):
        self.timeout_s = timeout_s
        self.aws_request_id = aws_request_id or f"local-{uuid.uuid4().hex}"
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


# --- the worker -------------------------------------------------------------------------------


@dataclass
class Summary:
    worker_id: int
    request_id: str
    batches: int = 0
    sent: int = 0
    failed: int = 0
    throttled: int = 0
    not_started: int = 0
    unknown: int = 0
    stop: str = ""

    def add(self, results: list[dict], size: int) -> None:
        self.batches += 1
        for result in results:
            status = result["status"]
            setattr(self, status, getattr(self, status) + 1)
        self.unknown += size - len(results)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _BatchRun:
    """Book-keeping shared by the sending threads of one batch."""

    window: Window
    concurrency: int
    # The most recipients one progress report may declare (the grant's chunk_limit; None from a
    # server too old to send one).
    chunk_limit: int | None = None
    throttled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    first_start: float | None = None
    last_done: float | None = None
    done: int = 0
    halt: str = ""

    def started(self, at: float) -> None:
        with self.lock:
            if self.first_start is None:
                self.first_start = at

    def finished(self, at: float) -> None:
        with self.lock:
            self.done += 1
            self.last_done = at if self.last_done is None else max(self.last_done, at)

    def rate_per_s(self, now: float) -> float | None:
        with self.lock:
            if self.first_start is None or self.done < self.concurrency:
                return None
            busy = now - self.first_start
            return self.done / busy if busy > 0 else None

    def limit(self, chunk: int) -> int:
        """`chunk`, but never more than the grant's chunk_limit."""
        return chunk if self.chunk_limit is None else min(chunk, self.chunk_limit)

    @property
    def elapsed_ms(self) -> int:
        if self.first_start is None or self.last_done is None:
            return 0
        return max(0, round((self.last_done - self.first_start) * 1000))


class Worker:
    """One invocation's loop, in steps a test can call one at a time: checkin, send_batch, run."""

    def __init__(
        self,
        event: dict,
        context,
        *,
        api: Api | None = None,
        provider_factory: Callable[[dict], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        try:
            api_url, token, worker_id = event["api_url"], event["token"], int(event["worker_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the event needs api_url, token and worker_id: {exc}") from exc
        self.context = context
        self.worker_id = worker_id
        self.clock = clock
        self.sleep = sleep
        self.api = api or Api(
            api_url,
            token,
            timeout_s=setting("WORKER_API_TIMEOUT_S"),
            retries=setting("WORKER_API_RETRIES"),
            backoff_ms=setting("WORKER_API_BACKOFF_MS"),
            sleep=sleep,
        )
        self._open_provider = provider_factory
        # Unique per process: a second delivery of the same invocation is told to stop.
        self.request_id = f"{context.aws_request_id}:{uuid.uuid4().hex}"[:100]
        self.seq = 0
        self.report: dict | None = None  # the last batch's report, not delivered yet
        self.rate_per_s: float | None = None
        self.last_batch_ms = 0
        self.summary = Summary(worker_id=worker_id, request_id=self.request_id)
        self._provider = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._provider_config: dict | None = None

    # Time.

    def remaining_ms(self) -> int:
        return self.context.get_remaining_time_in_millis()

    def deadline_margin_ms(self) -> int:
        return max(setting("WORKER_DEADLINE_MARGIN_MS"), 2 * self.last_batch_ms)

    def out_of_time(self) -> bool:
        return self.remaining_ms() < self.deadline_margin_ms()

    # Steps.

    def checkin(self, *, final: bool = False) -> Answer:
        """Report the last batch (if any) and get the next decision (always stop when final)."""
        self.seq += 1
        body = {
            "worker_id": self.worker_id,
            "seq": self.seq,
            "request_id": self.request_id,
            "report": self.report,
            "final": final,
        }
        first_sent = self.clock()
        answer = self.api.post("checkin", body)
        received = self.clock()
        if not isinstance(answer, dict) or "decision" not in answer or "token" not in answer:
            raise ApiError(f"checkin: unexpected answer {answer!r:.300}")
        self.api.token = answer["token"]
        self.report = None
        window = None
        if answer["decision"] == "send":
            window = Window.of(
                answer["batch"],
                received=received,
                first_sent=first_sent,
                retried=self.api.last_attempts > 1,
            )
        return Answer(answer["decision"], answer, window)

    def send_batch(self, batch: dict, window: Window) -> dict:
        """Send a batch inside its window; return the report for the next check-in."""
        began = self.clock()
        recipients = batch["recipients"]
        chunk_limit = batch.get("chunk_limit")
        run = _BatchRun(
            window=window,
            concurrency=max(1, int(batch["concurrency"])),
            chunk_limit=None if chunk_limit is None else max(1, int(chunk_limit)),
        )
        outcomes: list[dict | None]
        try:
            provider = self.provider_for(batch["provider"], batch)
        except Exception as exc:
            # A bad account or unknown kind: every recipient fails where staff can see why.
            log.exception("worker %s: cannot open the provider", self.worker_id)
            outcomes = [self._failed(r, exc, window) for r in recipients]
        else:
            compiled = self._compile(batch["messages"])
            outcomes = self._send_all(batch, recipients, provider, compiled, run)
        results = [o for o in outcomes if o is not None]
        self.summary.add(results, len(recipients))
        if run.done and run.elapsed_ms:
            self.rate_per_s = run.done * 1000 / run.elapsed_ms
        self.last_batch_ms = round((self.clock() - min(began, window.origin)) * 1000)
        report = {"lease_id": batch["lease_id"], "elapsed_ms": run.elapsed_ms, "results": results}
        counts = {s: sum(1 for r in results if r["status"] == s) for s in ("sent", "failed")}
        log.info(
            "worker %s: lease %s: %d recipients, %d sent, %d failed, %d unknown in %d ms%s",
            self.worker_id,
            batch["lease_id"],
            len(recipients),
            counts["sent"],
            counts["failed"],
            len(recipients) - len(results),
            run.elapsed_ms,
            f" (stopped: {run.halt})" if run.halt else "",
            extra={"worker_id": self.worker_id, "lease_id": batch["lease_id"]},
        )
        self.report = report
        return report

    def run(self) -> dict:
        """Check in and send until told to stop or out of time; returns the summary."""
        try:
            self.summary.stop = self._loop()
        except ApiError as exc:
            log.error("worker %s: stopping: %s", self.worker_id, exc)
            self.summary.stop = f"api error: {exc}"
        finally:
            self.close()
        log.info("worker %s: done: %s", self.worker_id, self.summary.as_dict())
        return self.summary.as_dict()

    def _loop(self) -> str:
        while True:
            if self.out_of_time():
                # Always said, report or not: the server then counts this worker as stopped
                # at once, and the conductor can start its replacement.
                self.final_checkin()
                return "deadline"
            answer = self.checkin()
            if answer.decision == "stop":
                return answer.body.get("reason", "stop")
            if answer.decision == "wait":
                room_s = (self.remaining_ms() - self.deadline_margin_ms()) / 1000
                self.sleep(max(0.0, min(answer.body.get("wait_ms", 1000) / 1000, room_s)))
                continue
            if answer.decision != "send":
                raise ApiError(f"checkin: unknown decision {answer.decision!r}")
            self.send_batch(answer.batch, answer.window)

    def final_checkin(self) -> None:
        """Deliver the last report before exiting, so nothing is left leased; the API answers a
        final check-in with stop and marks this worker stopped."""
        answer = self.checkin(final=True)
        if answer.decision != "stop":
            raise ApiError(f"final check-in answered {answer.decision!r}, expected stop")

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True)
        if self._provider is not None:
            provider, self._provider = self._provider, None
            provider.close()
        self.api.close()

    def _send_pool(self, concurrency: int) -> ThreadPoolExecutor:
        if self._pool is not None and self._pool_size != concurrency:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="send")
            self._pool_size = concurrency
        return self._pool

    # Sending.

    def provider_for(self, config: dict | None, batch: dict):
        """The provider for this config, kept open across batches (reopened if it changes)."""
        if config is None:
            raise RuntimeError("the customer has no provider account")
        if self._provider is not None and config == self._provider_config:
            return self._provider
        if self._provider is not None:
            self._provider.close()
            self._provider = None
        if self._open_provider is not None:
            provider = self._open_provider(config)
        else:
            from .providers import open_provider

            # The server's per-send timeout, when it says (pacing assumes nothing arrives later).
            timeout_ms = batch.get("send_timeout_ms")
            timeout = timeout_ms / 1000 if timeout_ms else None
            provider = open_provider(config, timeout=timeout)
        self._provider, self._provider_config = provider, config
        return provider

    def _compile(self, messages: dict) -> dict:
        from django.core.exceptions import ValidationError

        from .rendering import compile_message

        compiled = {}
        for message_id, m in messages.items():
            try:
                compiled[message_id] = compile_message(
                    subject=m["subject"], text_body=m["text"], html_body=m["html"]
                )
            except ValidationError as exc:
                log.error(
                    "worker %s: message %s does not compile: %s", self.worker_id, message_id, exc
                )
                compiled[message_id] = exc
        return compiled

    def may_start(self, run: _BatchRun) -> bool:
        now = self.clock()
        if run.throttled.is_set():
            run.halt = run.halt or "throttled"
            return False
        if now > run.window.stop_at:
            run.halt = run.halt or "window closed"
            return False
        if self.remaining_ms() < setting("WORKER_SEND_MARGIN_MS"):
            run.halt = run.halt or "deadline"
            return False
        return now >= run.window.start_at

    def _chunk_size(self, run: _BatchRun) -> int:
        """About a second of sending at the measured rate (never more than the window has
        left), at least `concurrency`, but never more than the grant's `chunk_limit` (which wins:
        it bounds what a crash right after this report costs the minute)."""
        now = self.clock()
        rate = run.rate_per_s(now) or self.rate_per_s
        if rate is None:
            return run.limit(run.concurrency)
        seconds = min(CHUNK_S, max(0.0, run.window.stop_at - now))
        return run.limit(max(run.concurrency, math.ceil(rate * seconds)))

    def _send_all(self, batch, recipients, provider, compiled, run: _BatchRun) -> list:
        outcomes: list[dict | None] = [{"id": r["id"], "status": "not_started"} for r in recipients]
        started_through = 0
        if run.window.stop_at <= max(self.clock(), run.window.start_at):
            # The answer came too late to use (its window closed by the server's clock): give it
            # all back without announcing anything.
            run.halt = "window closed"
            return outcomes
        if run.window.start_at > self.clock():
            # Announce the first chunk while waiting for the window to open, so that sending
            # starts right when it does.
            mark = min(len(recipients), run.limit(run.concurrency))
            if not self._progress(batch["lease_id"], mark, run):
                return outcomes
            started_through = mark
            self.sleep(max(0.0, run.window.start_at - self.clock()))
        slots = threading.BoundedSemaphore(run.concurrency)
        futures = {}
        # One pool for the worker's life: the provider keeps a connection per sending thread, so
        # new threads every batch would open (and keep) new connections every batch.
        with contextlib.nullcontext(self._send_pool(run.concurrency)) as pool:
            for index, recipient in enumerate(recipients):
                if not self.may_start(run):
                    break
                if index >= started_through:
                    mark = min(len(recipients), started_through + self._chunk_size(run))
                    if not self._progress(batch["lease_id"], mark, run):
                        break
                    started_through = mark
                if not self._take_slot(slots, run):
                    break
                future = pool.submit(
                    self._send_one, recipient, batch["messages"], compiled, provider, run
                )
                future.add_done_callback(lambda _: slots.release())
                futures[index] = future
            for index, future in futures.items():
                outcomes[index] = future.result()
        return outcomes

    def _progress(self, lease_id: int, mark: int, run: _BatchRun) -> bool:
        body = {"worker_id": self.worker_id, "lease_id": lease_id, "started_through": mark}
        try:
            self.api.post("progress", body)
        except ApiError as exc:
            # Without the mark recorded no send may start; the check-in will say what is wrong.
            log.error("worker %s: progress not recorded, batch stopped: %s", self.worker_id, exc)
            run.halt = f"progress failed: {exc}"
            return False
        return True

    def _take_slot(self, slots: threading.BoundedSemaphore, run: _BatchRun) -> bool:
        while not slots.acquire(timeout=SLOT_POLL_S):
            if not self.may_start(run):
                return False
        if not self.may_start(run):
            slots.release()
            return False
        return True

    def _send_one(self, recipient, messages, compiled, provider, run: _BatchRun) -> dict | None:
        from .providers import SendError, Throttled

        rid = recipient["id"]
        key = str(recipient["message"])
        template = messages[key]
        try:
            message = compiled[key]
            if isinstance(message, Exception):
                raise message
            subject, text, html = message.render(recipient.get("merge") or {})
        except Exception as exc:
            log.exception("worker %s: recipient %s does not render", self.worker_id, rid)
            return {"id": rid, "status": "failed", "permanent": True, "error": f"render: {exc}",
                    "done_ms": run.window.ms(self.clock())}  # fmt: skip
        if not self.may_start(run):
            return {"id": rid, "status": "not_started"}
        started = self.clock()
        run.started(started)
        try:
            provider_id = provider.send(
                recipient_id=rid,
                to=recipient["to"],
                subject=subject,
                text=text,
                html=html,
                from_email=template["from_email"],
                reply_to=template["reply_to"],
            )
        except Throttled as exc:
            run.throttled.set()
            run.finished(self.clock())
            return {"id": rid, "status": "throttled", "error": exc.message}
        except SendError as exc:
            done = self.clock()
            run.finished(done)
            return {"id": rid, "status": "failed", "permanent": exc.permanent,
                    "error": exc.message, "done_ms": run.window.ms(done)}  # fmt: skip
        except Exception:
            # The provider may or may not have the message: leave it out of the report, so the
            # server marks it unknown instead of sending it again.
            log.exception("worker %s: recipient %s: unexpected send error", self.worker_id, rid)
            run.finished(self.clock())
            return None
        done = self.clock()
        run.finished(done)
        return {"id": rid, "status": "sent", "provider_id": str(provider_id)[:255] or "(none)",
                "done_ms": run.window.ms(done)}  # fmt: skip

    def _failed(self, recipient: dict, exc: Exception, window: Window) -> dict:
        return {
            "id": recipient["id"],
            "status": "failed",
            "permanent": bool(getattr(exc, "permanent", False)),
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "done_ms": window.ms(self.clock()),
        }


def handler(event: dict, context) -> dict:
    """The Lambda entry point."""
    ensure_django()
    # Imported now, so that loading them does not eat into the first send window.
    import django.core.mail  # noqa: F401

    from . import providers  # noqa: F401

    worker = Worker(event, context)
    log.info("worker %s: started as %s", worker.worker_id, worker.request_id)
    return worker.run()


# --- python -m sending.worker -----------------------------------------------------------------


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
