"""A worker invocation's loop: check in (reporting the last batch), send the batch it is given,
repeat until told to stop or until its own time runs short."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .batch import AnswerTimes, BatchSender, Window
from .client import Api, ApiError
from .environment import setting

log = logging.getLogger("sending.worker")
MAX_LATE = 20  # late reports per check-in (wire.MAX_LATE)


@dataclass
class Answer:
    decision: str
    body: dict
    window: Window | None = None

    @property
    def batch(self) -> dict | None:
        return self.body.get("batch")


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

    def settle_late(self, result: dict) -> None:
        """A send left out of its batch's report (counted unknown) answered since."""
        status = result["status"]
        if status != "unknown":
            self.unknown -= 1
            setattr(self, status, getattr(self, status) + 1)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class WorkerLoop(BatchSender):
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
        # Sends still out when their batch was reported, by lease (see BatchSender._collect).
        self.stragglers: dict[int, list[Future]] = {}
        self.rate_per_s: float | None = None
        self.answer_times = AnswerTimes()
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
        self.fold_answered_stragglers()
        body = {
            "worker_id": self.worker_id,
            "seq": self.seq,
            "request_id": self.request_id,
            "report": self.report,
            "final": final,
            # The server ends a grant's window that much before the minute's last safe moment.
            "answer_ms": math.ceil(self.answer_s() * 1000),
        }
        late = self.late_reports(limit=MAX_LATE)
        if late:
            body["late"] = late
        first_sent = self.clock()
        answer = self.api.post("checkin", body)
        received = self.clock()
        if not isinstance(answer, dict) or "decision" not in answer or "token" not in answer:
            raise ApiError(f"checkin: unexpected answer {answer!r:.300}")
        self.api.token = answer["token"]
        self.report = None
        for report in late:
            del self.stragglers[report["lease_id"]]
        window = None
        if answer["decision"] == "send":
            window = Window.of(answer["batch"], received=received, first_sent=first_sent)
        return Answer(answer["decision"], answer, window)

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
                self.await_stragglers()
                self.final_checkin()
                return "deadline"
            answer = self.checkin()
            if answer.decision == "stop":
                if self.stragglers:
                    # Sends still out from an earlier batch: their outcomes are the truth too.
                    self.await_stragglers()
                    self.final_checkin()
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
