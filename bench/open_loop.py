"""Open-loop check-ins for ``bench.worker_api``: arrivals on a Poisson schedule at a fraction of
the saturated capacity, latency measured from each check-in's scheduled arrival.

A closed loop (each worker checks in again as soon as it is answered) slows its own arrivals when
the server slows, so its latencies hide the queueing a real fleet of independent workers would
meet ("coordinated omission"). Here the arrival times are drawn first (exponential gaps at rate
``level x capacity``), a pool of simulated workers takes them in order, and a check-in's latency
is ``answer read - scheduled arrival``: when every worker is busy, the wait for one counts.
``late_starts`` says how often a check-in was sent more than LATE_MS after its schedule — if the
pool, not the server, were the bottleneck, that count would be large.
"""

from __future__ import annotations

import http.client
import itertools
import random
import threading
import time
from dataclasses import dataclass, field

import orjson

LEVELS = (25, 50, 75)  # percent of the saturated capacity
WORKERS_PER_CUSTOMER = 8
BATCH_SIZE = 500
# The provider throughput the open-loop workers claim in their reports (sends per second). Lower
# than the saturated phase's: pacing keeps a worker while the backlog fills it for a guarded
# window at this rate, and at 250/s eight workers a customer stay needed while its backlog is
# above about 52,000 (so no run ends in "surplus" stops). The server's work per check-in (the
# same statements, a 500 report and a 500 batch) does not depend on it.
NOMINAL_WORKER_RATE = 250
DONE_MS = 20
WARMUP_S = 2.0
# Long enough that a p99 rests on a dozen check-ins or more at 50 % (15 s gave about four: one
# burst more or less moved it by half).
DURATION_S = 40.0
LATE_MS = 5.0
# uvicorn closes a connection idle for 5 s (its keep-alive timeout); at low rates a worker's
# connection idles longer, so it is reopened first (as a real worker's HTTP client would).
IDLE_RECONNECT_S = 4.0
HTTP_TIMEOUT_S = 30.0
CHECKIN_PATH = "/api/worker/v1/checkin"
BACKLOG_FLOOR = 60_000  # recipients a customer keeps beyond what the levels consume


def arrivals(rate_per_s: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrival times in [0, seconds): exponential gaps of mean 1 / rate."""
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate_per_s)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times


def recipients_needed(capacity_checkins_per_s: float) -> int:
    """Recipients a customer's message needs for every level, with the backlog floor kept."""
    consumed = sum(LEVELS) / 100 * capacity_checkins_per_s * (WARMUP_S + DURATION_S) * BATCH_SIZE
    return int(consumed / 2) + BACKLOG_FLOOR


@dataclass
class SimWorker:
    """A simulated worker's protocol state, kept across levels."""

    customer_id: int
    worker_id: int = 0
    token: str = ""
    seq: int = 1
    report: dict | None = None

    def register(self) -> None:
        from sending.checkin import worker_start

        worker, self.token = worker_start(customer_id=self.customer_id)
        self.worker_id, self.seq, self.report = worker.pk, 1, None


@dataclass
class Level:
    """What one load level measured: (scheduled s, latency ms, report n, batch n, decision,
    held ms: the server's hold from the request's arrival to its decision, as a grant says)."""

    rate_per_s: float
    scheduled: int
    samples: list[tuple[float, float, int, int, str, int | None]] = field(default_factory=list)
    late_starts: int = 0
    # CPU seconds this process (the simulated workers' threads) used during the level: the
    # load generator shares the machine's cores with the server and PostgreSQL.
    client_cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def report_for(batch: dict, *, rate_per_s: float, done_ms: int = DONE_MS) -> dict:
    """A simulated worker's report: every recipient of the batch sent, the batch having taken
    as long as `rate_per_s` sends a second would (reported, not slept)."""
    recipients = batch["recipients"]
    return {
        "lease_id": batch["lease_id"],
        "elapsed_ms": max(1, round(len(recipients) * 1000 / rate_per_s)),
        "results": [
            {"id": r["id"], "status": "sent", "provider_id": f"sim-{r['id']}", "done_ms": done_ms}
            for r in recipients
        ],
    }


def _checkin(conn: http.client.HTTPConnection, worker: SimWorker) -> tuple[int, bytes]:
    body = orjson.dumps(
        {
            "worker_id": worker.worker_id,
            "seq": worker.seq,
            "request_id": f"open-{worker.worker_id}",
            "report": worker.report,
        }
    )
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {worker.token}"}
    conn.request("POST", CHECKIN_PATH, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def _run_worker(worker: SimWorker, port: int, start: float, times: list[float], nxt, level: Level):
    from django.db import connection

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    last_used = time.monotonic()
    try:
        while True:
            i = nxt()
            if i >= len(times):
                return
            scheduled = start + times[i]
            delay = scheduled - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif -delay * 1000 > LATE_MS:
                with level.lock:
                    level.late_starts += 1
            if time.monotonic() - last_used > IDLE_RECONNECT_S:
                conn.close()  # the next request connects again
            try:
                status, data = _checkin(conn, worker)
            except (ConnectionError, http.client.RemoteDisconnected):
                conn.close()  # closed by the server; a repeated seq is answered again (replay)
                status, data = _checkin(conn, worker)
            answered = last_used = time.monotonic()
            if status != 200:
                level.errors.append(f"HTTP {status}: {data[:300]!r}")
                return
            answer = orjson.loads(data)
            reported = len(worker.report["results"]) if worker.report else 0
            decision = answer["decision"]
            granted = len(answer["batch"]["recipients"]) if decision == "send" else 0
            held = answer["batch"].get("held_ms") if decision == "send" else None
            with level.lock:
                level.samples.append(
                    (times[i], (answered - scheduled) * 1000, reported, granted, decision, held)
                )
            worker.token, worker.seq, worker.report = answer["token"], worker.seq + 1, None
            if decision == "send":
                worker.report = report_for(answer["batch"], rate_per_s=NOMINAL_WORKER_RATE)
            elif decision == "wait":
                time.sleep(min(answer["wait_ms"] / 1000, max(0.0, start + times[-1] - answered)))
            else:  # stopped: a new worker takes its place, as the conductor would start one
                worker.register()
    except Exception as exc:  # reported in the summary, the run fails
        level.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
        connection.close()


def run_level(workers: list[SimWorker], port: int, rate_per_s: float, seed: int) -> Level:
    times = arrivals(rate_per_s, WARMUP_S + DURATION_S, seed)
    level = Level(rate_per_s=rate_per_s, scheduled=len(times))
    counter = itertools.count()
    take = threading.Lock()

    def nxt() -> int:
        with take:
            return next(counter)

    start = time.monotonic() + 0.2
    cpu_before = time.process_time()
    threads = [
        threading.Thread(target=_run_worker, args=(w, port, start, times, nxt, level))
        for w in workers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.client_cpu_s = time.process_time() - cpu_before
    return level


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(level: Level) -> dict:
    """Latency of the check-ins scheduled after the warm-up (all of them, and the 500/500 ones)."""
    measured = [s for s in level.samples if s[0] >= WARMUP_S]
    latencies = [s[1] for s in measured]
    full = [s[1] for s in measured if s[2] == BATCH_SIZE and s[3] == BATCH_SIZE]
    decisions: dict[str, int] = {}
    for s in measured:
        decisions[s[4]] = decisions.get(s[4], 0) + 1
    return {
        "rate_per_s": level.rate_per_s,
        "checkins": len(measured),
        "full": len(full),
        "p50": _percentile(latencies, 50),
        "p99": _percentile(latencies, 99),
        "full_p50": _percentile(full, 50),
        "full_p99": _percentile(full, 99),
        # The server's hold before deciding (waits for a thread, the event loop, locks).
        "held_p50": _percentile([s[5] for s in measured if s[5] is not None], 50),
        "held_p99": _percentile([s[5] for s in measured if s[5] is not None], 99),
        "late_starts": level.late_starts,
        # over every check-in of the level, the warm-up's included
        "client_cpu_ms_per_checkin": level.client_cpu_s * 1000 / max(1, len(level.samples)),
        "decisions": decisions,
        "errors": level.errors,
    }


def run(customer_ids: list[int], port: int, capacity_checkins_per_s: float) -> dict[str, dict]:
    """Every level against the running server, on the open-loop customers' workers."""
    workers = [SimWorker(c) for c in customer_ids for _ in range(WORKERS_PER_CUSTOMER)]
    for worker in workers:
        worker.register()
    results = {}
    for n, percent in enumerate(LEVELS):
        level = run_level(workers, port, capacity_checkins_per_s * percent / 100, seed=n + 1)
        results[str(percent)] = summary(level)
    return results
