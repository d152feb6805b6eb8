"""The burst baseline of ``bench.e2e`` (``--burst-baseline``): what a team would build to fill each
minute without pacing — a beat-like task that at every minute's start enqueues that minute's cap
of one-email tasks, sent by unthrottled Celery workers.

Every minute start (on our clock), the beat thread in the bench process enqueues, per customer,
the next ``SendLimit.per_minute`` of its queued recipients as one task each (interleaved across
customers). ``BURST_WORKERS`` Celery workers (``celery -A bench.burst:burst_app worker --pool
threads --concurrency 8``), with no rate limit, send each through the same task body as the
rate-limited baseline (``bench.e2e``: render, send through the shared provider code with the
recipient id as idempotency key, record the outcome; a 429 fails the recipient). With
``--burst-baseline`` the sandbox's clock runs ``CLOCK_BEHIND_MS`` behind ours for the whole run
(ours and every baseline alike): a burst sent at our minute's start lands in the provider's
previous minute, already full. Measured at the sandbox as ``bench.e2e`` measures ours, plus
``refusals`` (429s).
"""

from __future__ import annotations

import os
import sys
import threading
import time

from celery import Celery

CLOCK_BEHIND_MS = 300
SANDBOX_ARGS = ["--clock-offset-ms", str(-CLOCK_BEHIND_MS)]
BURST_WORKERS = 2
BURST_CONCURRENCY = 8
QUEUE = "e2e_burst"
WINDOW_MS = 60_000

burst_app = Celery("bench_burst", set_as_current=False)
burst_app.conf.update(
    broker_url=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/5",
    result_backend=None,
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    timezone="UTC",
)


@burst_app.task(name="bench.burst.send", ignore_result=True)
def send(recipient_id: int) -> str:
    from bench.e2e import _baseline_send

    return _baseline_send(recipient_id)


class Beat(threading.Thread):
    """At every minute's start on our clock, enqueue each customer's next `cap` recipients."""

    def __init__(self, customers: list, pending: dict[int, list[int]], stop: threading.Event):
        super().__init__(name="burst-beat", daemon=True)
        self.customers, self.pending, self.stop_event = customers, pending, stop
        self.bursts: list[dict] = []  # {"minute_ms", "enqueued", "late_ms", "took_ms"}

    def run(self) -> None:
        while not self.stop_event.is_set() and any(self.pending.values()):
            now_ms = time.time_ns() // 1_000_000
            minute_ms = now_ms - now_ms % WINDOW_MS + WINDOW_MS
            if self.stop_event.wait((minute_ms - now_ms) / 1000):
                return
            fired_ms = time.time_ns() // 1_000_000
            burst = {"minute_ms": minute_ms, "late_ms": fired_ms - minute_ms, "enqueued": 0}
            self.bursts.append(burst)
            batches = {}
            for c in self.customers:
                ids = self.pending[c.message_id]
                batches[c.message_id], self.pending[c.message_id] = ids[: c.cap], ids[c.cap :]
            with burst_app.producer_or_acquire() as producer:
                for i in range(max(len(b) for b in batches.values())):
                    for ids in batches.values():
                        if i < len(ids):
                            send.apply_async((ids[i],), queue=QUEUE, producer=producer)
                            burst["enqueued"] += 1
            burst["took_ms"] = time.time_ns() // 1_000_000 - fired_ms


def refusals(customers: list, report: dict) -> int:
    """429s the sandbox answered these customers' keys."""
    throttled = report.get("throttled", {})
    return sum(sum(throttled.get(c.api_key, {}).values()) for c in customers)


def run(customers: list, duration_s: float, procs: list, sandbox_port: int) -> dict:
    """Start the workers, burst at every minute's start until the backlog is sent or
    `duration_s` has passed since the first burst; measure at the sandbox."""
    from django.db.models import Q

    from bench import e2e
    from sending.models import Recipient

    burst_app.conf.broker_url = os.environ["REDIS_URL"]
    ids = [c.message_id for c in customers]
    pending = {
        c.message_id: list(
            Recipient.objects.filter(message_id=c.message_id)
            .order_by("id")
            .values_list("id", flat=True)
        )
        for c in customers
    }
    sampler = e2e.Sampler(ids).start()
    workers = []
    for i in range(BURST_WORKERS):
        p = e2e.Proc(
            f"burst-{i + 1}",
            [sys.executable, "-m", "celery", "-A", "bench.burst:burst_app", "worker",
             "--pool", "threads", "--concurrency", str(BURST_CONCURRENCY), "-Q", QUEUE,
             "-n", f"e2e-burst-{i + 1}@%h", "--without-mingle", "--without-gossip",
             "--loglevel", "INFO"],
        )  # fmt: skip
        procs.append(p)
        workers.append(p)
    for p in workers:
        p.wait_for_text(" ready.")
    stop = threading.Event()
    beat = Beat(customers, pending, stop)
    beat.start()
    print(f"[burst] {BURST_WORKERS} workers up; bursts from the next minute; load {e2e._load()}")
    # The run's clock starts at the first burst (the next minute's start), as ours starts with
    # its messages.
    while not beat.bursts and beat.is_alive():
        time.sleep(0.05)
    t0 = time.monotonic()
    done = False
    last_print = 0.0
    while True:
        elapsed = time.monotonic() - t0
        if not any(pending.values()) and not beat.is_alive():
            open_ = Recipient.objects.filter(
                Q(status="queued") | Q(status="leased"), message_id__in=ids
            ).exists()
            if not open_:
                done = True
                break
        if elapsed >= duration_s:
            break
        for p in workers:
            if p.process.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.process.returncode}:\n{p.tail()}")
        if elapsed - last_print >= 15:
            last_print = elapsed
            queued = sampler.latest()
            print(
                f"[burst] t={elapsed:5.0f}s queued "
                + ", ".join(f"{c.label}={queued.get(c.message_id, '?')}" for c in customers)
                + f"; load {e2e._load()}",
                flush=True,
            )
        time.sleep(0.5)
    stop.set()
    elapsed_s = time.monotonic() - t0
    time.sleep(e2e.SAMPLE_EVERY_S * 2)
    sampler.stop()
    final_counts = e2e._status_counts(ids)
    logs = ""
    for p in workers:
        logs += p.text()
        p.stop()
    report = e2e._sandbox_report(sandbox_port)
    measured = e2e.measure(customers, report, sampler, final_counts)
    measured["result"]["refusals"] = refusals(customers, report)
    print(
        f"[burst] {'all recipients done' if done else 'duration reached'} after {elapsed_s:.1f} s;"
        f" bursts {beat.bursts}; load {e2e._load()}",
        flush=True,
    )
    return {
        "elapsed_s": elapsed_s,
        "completed": done,
        "measured": measured,
        "bursts": beat.bursts,
        "errors": e2e._log_problems(logs),
    }


def print_beside(ours: dict, ours_refusals: int, burst: dict) -> dict:
    """Ours and the burst baseline side by side; returns the burst's keys for the JSON line."""
    from bench import e2e

    e2e.print_table(
        f"BURST BASELINE (beat enqueues each minute's cap at its start, {BURST_WORKERS} "
        f"unthrottled Celery workers, sandbox clock {CLOCK_BEHIND_MS} ms behind; "
        f"{burst['elapsed_s']:.1f} s)",
        burst["measured"],
    )
    for line in burst["errors"]:
        print(f"  log: {line}")
    b = burst["measured"]["result"]
    print(f"  beside ours (sandbox clock {CLOCK_BEHIND_MS} ms behind for both):")
    print(f"    {'':28}{'ours':>12}{'burst':>12}")
    for name, a, z in (
        ("over-cap minutes", ours["over_cap_minutes"], b["over_cap_minutes"]),
        ("refusals (429)", ours_refusals, b["refusals"]),
        ("utilization min", ours["utilization_min"], b["utilization_min"]),
        ("duplicates", ours["duplicates"], b["duplicates"]),
        ("lost", ours["lost"], b["lost"]),
    ):
        print(f"    {name:28}{_fmt(a):>12}{_fmt(z):>12}")
    return {**b, "elapsed_s": round(burst["elapsed_s"], 1), "bursts": burst["bursts"]}


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
