"""Sending one batch: its window on the monotonic clock, progress marks before each chunk, up to
`concurrency` provider calls in flight, and the report of what happened to each recipient."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from .client import ApiError
from .environment import setting

log = logging.getLogger("sending.worker")
CHUNK_S = 1.0  # about this much sending per progress call
SLOT_POLL_S = 0.05  # how often a sender waiting for a free slot re-checks the window
# A batch's report waits for its sends still out at most this long after its last start, and
# never past this long after its window closed: the server presumes a worker lost
# (pacing.OVERDUE_SLACK_MS, 1.5 s after the window) and reclaims its lease. What is still out
# then goes in the report as left out (`unknown`), and its outcome in a later check-in's `late`.
STRAGGLER_S = 1.0
REPORT_SLACK_S = 0.75
# A send answered after its minute's last safe moment is charged to the next minute as well
# (docs/pacing.md), so none starts that it expects to be answered later: by the 90th
# percentile of the last 64 answer times, with a quarter on top.
ANSWER_SAMPLES = 64
ANSWER_QUANTILE = 0.9
ANSWER_MARGIN = 1.25


class AnswerTimes:
    """How long the provider takes to answer a send, as this worker measured it (all its
    batches: the sending threads add to it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=ANSWER_SAMPLES)

    def add(self, seconds: float) -> None:
        with self._lock:
            self._recent.append(max(0.0, seconds))

    def estimate_s(self) -> float | None:
        """The answer time to plan by (None before the first answer)."""
        with self._lock:
            recent = sorted(self._recent)
        if not recent:
            return None
        return recent[min(len(recent) - 1, int(len(recent) * ANSWER_QUANTILE))] * ANSWER_MARGIN


@dataclass(frozen=True)
class Window:
    """A batch's send window on the monotonic clock (seconds)."""

    origin: float  # when the answer arrived
    first_sent: float  # when the request's first attempt was sent
    # The earliest the server can have read its clock: the request's first attempt was sent,
    # and then the server held the request for `held_ms` of its own time before reading it.
    early_origin: float
    start_at: float
    stop_at: float
    # A send answered after this is charged to the next minute as well (None: the server did
    # not say, so no such check).
    answer_by: float | None = None

    @classmethod
    def of(cls, batch: dict, *, received: float, first_sent: float) -> Window:
        """The server's offsets are relative to when it read its clock, somewhere between our
        first attempt and the answer's arrival (lock waits and a slow network included). Each end
        takes the anchor that errs on the safe side: the start from the arrival (never before the
        server meant), the end and the answer times from the earliest the server can have read
        its clock (never after). That is our first attempt plus `held_ms`, how long the server
        says it held the request (queued for a thread, waiting for locks) before reading its
        clock: the request reached it no earlier than we sent it, and the hold came after. On a
        busy server, that hold is most of the round trip; without it a grant whose answer took
        longer than its window would arrive already closed."""
        held_s = max(0, batch.get("held_ms") or 0) / 1000
        early_origin = min(received, first_sent + held_s)
        answer_by_in_ms = batch.get("answer_by_in_ms")
        return cls(
            origin=received,
            first_sent=first_sent,
            early_origin=early_origin,
            start_at=received + batch["start_in_ms"] / 1000,
            stop_at=early_origin + batch["stop_starting_in_ms"] / 1000,
            answer_by=None if answer_by_in_ms is None else early_origin + answer_by_in_ms / 1000,
        )

    def ms(self, at: float) -> int:
        """`at` as ms after the grant arrived, rounded up (a later done_ms is the safe side)."""
        return max(0, math.ceil((at - self.early_origin) * 1000))


@dataclass
class BatchRun:
    """Book-keeping shared by the sending threads of one batch."""

    window: Window
    concurrency: int
    # The most recipients one progress report may declare (the grant's chunk_limit; None from a
    # server too old to send one).
    chunk_limit: int | None = None
    # The server's per-send timeout (None from a server that does not say): an unanswered send
    # may reach the provider until its start plus this (docs/pacing.md, A3).
    send_timeout_s: float | None = None
    throttled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    first_start: float | None = None
    last_done: float | None = None
    done: int = 0
    halt: str = ""
    reported: bool = False  # the report went without the sends still out: start nothing more
    out: dict[int, float] = field(default_factory=dict)  # sends under way: id -> start

    def started(self, rid: int, at: float) -> None:
        with self.lock:
            if self.first_start is None:
                self.first_start = at
            self.out[rid] = at

    def finished(self, rid: int, at: float) -> float:
        """Note a send answered at `at`; returns how long it took."""
        with self.lock:
            self.done += 1
            self.last_done = at if self.last_done is None else max(self.last_done, at)
            return at - self.out.pop(rid, at)

    def oldest_out_s(self, now: float) -> float:
        """How long the longest-running send still out has been waiting for its answer."""
        with self.lock:
            return now - min(self.out.values(), default=now)

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


class BatchSender:
    """Sending one batch inside its window (a part of WorkerLoop: the attributes it uses are the
    loop's)."""

    def send_batch(self, batch: dict, window: Window) -> dict:
        """Send a batch inside its window; return the report for the next check-in."""
        began = self.clock()
        recipients = batch["recipients"]
        chunk_limit = batch.get("chunk_limit")
        send_timeout_ms = batch.get("send_timeout_ms")
        run = BatchRun(
            window=window,
            concurrency=max(1, int(batch["concurrency"])),
            chunk_limit=None if chunk_limit is None else max(1, int(chunk_limit)),
            send_timeout_s=send_timeout_ms / 1000 if send_timeout_ms else None,
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
            from ..providers import open_provider

            # The server's per-send timeout, when it says (pacing assumes nothing arrives later).
            timeout_ms = batch.get("send_timeout_ms")
            timeout = timeout_ms / 1000 if timeout_ms else None
            provider = open_provider(config, timeout=timeout)
        self._provider, self._provider_config = provider, config
        return provider

    def _compile(self, messages: dict) -> dict:
        from django.core.exceptions import ValidationError

        from ..rendering import compile_message

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

    def may_start(self, run: BatchRun) -> bool:
        now = self.clock()
        if run.reported:
            run.halt = run.halt or "reported"
            return False
        if run.throttled.is_set():
            run.halt = run.halt or "throttled"
            return False
        if now > run.window.stop_at:
            run.halt = run.halt or "window closed"
            return False
        answer_by = run.window.answer_by
        if answer_by is not None and now + self.answer_s(run, now) > answer_by:
            run.halt = run.halt or "answers would come after the minute's last safe moment"
            return False
        if self.remaining_ms() < setting("WORKER_SEND_MARGIN_MS"):
            run.halt = run.halt or "deadline"
            return False
        return now >= run.window.start_at

    def answer_s(self, run: BatchRun | None = None, now: float | None = None) -> float:
        """How long a send started now is expected to take: as measured, else the guess, or
        longer when a send of this batch has been out longer than that (never more than the
        send timeout, after which a send is given up)."""
        estimate = self.answer_times.estimate_s()
        if estimate is None:
            estimate = setting("WORKER_ANSWER_GUESS_MS") / 1000
            if run is not None and now is not None:
                estimate = max(estimate, run.oldest_out_s(now))
        timeout = run.send_timeout_s if run is not None else None
        return estimate if timeout is None else min(estimate, timeout)

    def _chunk_size(self, run: BatchRun) -> int:
        """About a second of sending at the measured rate (never more than the window has
        left), at least `concurrency`, but never more than the grant's `chunk_limit` (which wins:
        it bounds what a crash right after this report costs the minute)."""
        now = self.clock()
        rate = run.rate_per_s(now) or self.rate_per_s
        if rate is None:
            return run.limit(run.concurrency)
        seconds = min(CHUNK_S, max(0.0, run.window.stop_at - now))
        return run.limit(max(run.concurrency, math.ceil(rate * seconds)))

    def _send_all(self, batch, recipients, provider, compiled, run: BatchRun) -> list:
        outcomes: list[dict | None] = [{"id": r["id"], "status": "not_started"} for r in recipients]
        started_through = 0
        if run.window.stop_at <= max(self.clock(), run.window.start_at):
            # The answer came too late to use (its window closed by the server's clock): give it
            # all back without announcing anything.
            run.halt = "window closed"
            log.warning(
                "worker %s: lease %s: the grant came %d ms after the check-in was sent, its "
                "window closed %d ms after that: giving the batch back",
                self.worker_id,
                batch["lease_id"],
                round((run.window.origin - run.window.first_sent) * 1000),
                round((run.window.stop_at - run.window.first_sent) * 1000),
                extra={"worker_id": self.worker_id, "lease_id": batch["lease_id"]},
            )
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
        return self._collect(batch["lease_id"], futures, outcomes, run)

    def _collect(self, lease_id: int, futures: dict[int, Future], outcomes: list, run: BatchRun):
        """The batch's outcomes, waiting for the sends still out only as long as the report can
        wait (STRAGGLER_S, REPORT_SLACK_S). A send still out then is left out of the report (the
        server marks it `unknown`) and kept in `stragglers`, reported late once it is answered:
        one slow provider call no longer holds the whole batch past its lease."""
        deadline = min(run.window.stop_at + REPORT_SLACK_S, self.clock() + STRAGGLER_S)
        wait(futures.values(), timeout=max(0.0, deadline - self.clock()))
        run.reported = True  # from here a send not yet begun will not begin
        out = []
        for index, future in futures.items():
            if future.done():
                outcomes[index] = future.result()
            else:
                outcomes[index] = None
                out.append(future)
        if out:
            log.info(
                "worker %s: lease %s: reporting with %d sends still out",
                self.worker_id,
                lease_id,
                len(out),
                extra={"worker_id": self.worker_id, "lease_id": lease_id},
            )
            self.stragglers[lease_id] = out
        return outcomes

    def fold_answered_stragglers(self) -> None:
        """Sends of the undelivered report's own lease answered since it was written go into it.

        A lease is reported once on time and only what is still out after that goes `late`: a
        `late` entry beside the report for the same lease is a conflict (409: "report it, not as
        late", or "one report per lease" when the lease was reclaimed meanwhile), which stopped
        the worker and left its sends `unknown` (bench.e2e --scenario slow)."""
        if self.report is None:
            return
        lease_id = self.report["lease_id"]
        futures = self.stragglers.get(lease_id)
        if not futures or not all(f.done() for f in futures):
            return
        del self.stragglers[lease_id]
        answered = [r for r in (f.result() for f in futures) if r is not None]
        for result in answered:
            self.summary.settle_late(result)
        self.report = {**self.report, "results": [*self.report["results"], *answered]}

    def late_reports(self, *, limit: int) -> list[dict]:
        """Reports for leases whose last sends are all answered now (at most `limit`): the
        rest of those leases, for the next check-in's `late`."""
        late = []
        reporting = None if self.report is None else self.report["lease_id"]
        for lease_id, futures in self.stragglers.items():
            if lease_id == reporting or len(late) >= limit or not all(f.done() for f in futures):
                continue
            results = [r for r in (f.result() for f in futures) if r is not None]
            for result in results:
                self.summary.settle_late(result)
            late.append({"lease_id": lease_id, "elapsed_ms": 0, "results": results})
        return late

    def await_stragglers(self) -> None:
        """Before exiting: wait for the sends still out (each ends by the provider's timeout),
        within the invocation's time."""
        futures = [f for out in self.stragglers.values() for f in out]
        if futures:
            room_s = (self.remaining_ms() - setting("WORKER_SEND_MARGIN_MS")) / 1000
            wait(futures, timeout=max(0.0, room_s))

    def _progress(self, lease_id: int, mark: int, run: BatchRun) -> bool:
        body = {"worker_id": self.worker_id, "lease_id": lease_id, "started_through": mark}
        try:
            self.api.post("progress", body)
        except ApiError as exc:
            # Without the mark recorded no send may start; the check-in will say what is wrong.
            log.error("worker %s: progress not recorded, batch stopped: %s", self.worker_id, exc)
            run.halt = f"progress failed: {exc}"
            return False
        return True

    def _take_slot(self, slots: threading.BoundedSemaphore, run: BatchRun) -> bool:
        while not slots.acquire(timeout=SLOT_POLL_S):
            if not self.may_start(run):
                return False
        if not self.may_start(run):
            slots.release()
            return False
        return True

    def _send_one(self, recipient, messages, compiled, provider, run: BatchRun) -> dict | None:
        from ..providers import SendError, Throttled

        rid = recipient["id"]
        key = str(recipient["message"])
        template = messages[key]
        try:
            message = compiled[key]
            if isinstance(message, Exception):
                raise message
            subject, text, html = message.render(_merge_fields(recipient))
        except Exception as exc:
            log.exception("worker %s: recipient %s does not render", self.worker_id, rid)
            return {"id": rid, "status": "failed", "permanent": True, "error": f"render: {exc}",
                    "done_ms": run.window.ms(self.clock())}  # fmt: skip
        if not self.may_start(run):
            return {"id": rid, "status": "not_started"}
        started = self.clock()
        run.started(rid, started)
        try:
            provider_id = provider.send(
                recipient_id=rid,
                to=recipient["to"],
                subject=subject,
                text=text,
                html=html,
                from_email=template["from_email"],
                reply_to=template["reply_to"],
                unsubscribe_url=recipient.get("unsubscribe_url") or "",
                unsubscribe_mailto=template.get("unsubscribe_mailto") or "",
            )
        except Throttled as exc:
            run.throttled.set()
            done = self.clock()
            self.answer_times.add(run.finished(rid, done))
            # When it was refused, and the provider's Retry-After: pacing judges the refusal by
            # them (sending/throttle.py).
            result = {"id": rid, "status": "throttled", "error": exc.message,
                      "done_ms": run.window.ms(done)}  # fmt: skip
            if exc.retry_after is not None:
                result["retry_after_ms"] = max(0, math.ceil(exc.retry_after * 1000))
            return result
        except SendError as exc:
            done = self.clock()
            self.answer_times.add(run.finished(rid, done))
            if exc.maybe_sent:
                # In doubt (a read timeout, a connection lost after the message went out): the
                # provider may have it. Unknown, never failed: a failure would be sent again. Its
                # done_ms is the latest it can have arrived: not before its start plus the send
                # timeout (a connection lost early says nothing about when the provider takes it).
                latest = done if run.send_timeout_s is None else started + run.send_timeout_s
                return {"id": rid, "status": "unknown", "error": exc.message,
                        "done_ms": run.window.ms(max(done, latest))}  # fmt: skip
            return {"id": rid, "status": "failed", "permanent": exc.permanent,
                    "error": exc.message, "done_ms": run.window.ms(done)}  # fmt: skip
        except Exception:
            # The provider may or may not have the message: leave it out of the report, so the
            # server marks it unknown instead of sending it again.
            log.exception("worker %s: recipient %s: unexpected send error", self.worker_id, rid)
            run.finished(rid, self.clock())
            return None
        done = self.clock()
        self.answer_times.add(run.finished(rid, done))
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


def _merge_fields(recipient: dict) -> dict:
    """The recipient's merge data, plus `unsubscribe_url` (the server's signed link wins over a
    merge field of the same name: a list cannot send a link of its own choosing)."""
    merge = dict(recipient.get("merge") or {})
    if recipient.get("unsubscribe_url"):
        merge["unsubscribe_url"] = recipient["unsubscribe_url"]
    return merge
