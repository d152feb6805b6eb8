"""Virtual-time simulator for the pacing core (no real sleeping, deterministic given a seed).

``simulate(config)`` drives the real ``sending.pacing`` functions (``decide``, ``charge``,
``settle``, ``settle_abandoned``, ``apply_settlement``, ``next_rate``, ``workers_needed``,
``progress_chunk``) for one
customer, with an in-memory ledger per customer-minute changed exactly as the worker API changes
its rows, and counts every send at a simulated provider. ``simulate_baseline(config)`` runs the
same latency/skew model with a per-worker token bucket instead (how a careful Celery user splits
``rate_limit`` over workers).

Model
-----
- Server clock: the simulation's time (integer ms; the ledger, decide and leases use it).
- Provider: counts each send when it ARRIVES, per calendar minute of its own clock, which is off
  by a per-run skew uniform in +-``provider_skew_ms``. Worst case for crossing: a send arrives
  when its response is back at the worker (arrival = start + latency). It never throttles; a
  minute with more arrivals than the cap is an over-cap minute, and accepted = min(count, cap).
- Provider latency: lognormal, median 40 ms, p99 400 ms (sigma = ln(10) / 2.326), cut at the
  send timeout ``spill_hold_ms``.
- Check-in request and response: one-way latency uniform in ``response_latency_ms`` each way.
- Worker: ``concurrency`` threads take the batch's recipients in order from a shared queue. It
  anchors its
  window on its monotonic clock when it receives the grant; its wall clock is off by up to
  +-``worker_clock_skew_ms`` (modelled: it converts to its own clock and back, and cancels out,
  which is the point). It reports per-send done times relative to receipt, and its busy time.
- Progress (A6 of ``sending.pacing``): the batch is cut into chunks of
  ``pacing.progress_chunk`` recipients, given the cap (about a second at the worker's measured
  rate, at least ``concurrency``, but never more than ``pacing.chunk_limit`` of the cap, which
  wins). Before a chunk the worker sends a progress report declaring
  ``started_through`` = the end of that chunk, and starts none of the chunk's sends before the
  acknowledgment is back (one-way latency each way, drawn like a check-in's). The first report
  is sent one check-in round trip before the window opens (at once if it is already open); the
  report for chunk k+1 is sent when the last ``concurrency`` sends of chunk k begin (when its
  first send begins if a chunk is smaller than ``concurrency``), so a busy worker seldom waits
  for it, one report is outstanding at a time, and the mark runs at most two chunks ahead of
  the starts. The server's mark is the largest one that has ARRIVED; a report arriving after
  the lease was settled is refused and the worker starts nothing more.
- Cold start: uniform in ``cold_start_ms`` before a new worker's first check-in. A worker exits
  at its first check-in after ``lifetime_minutes`` (the Lambda deadline) and the conductor starts
  a replacement at once (after a cold start).
- Crash: with probability ``crash_p`` per batch a worker dies at a uniform time between
  receiving the grant and the batch's end (so also between a progress report and its chunk's
  first start). Sends it had started still arrive and are counted; reports it had sent still
  arrive at the server.
- Abandonment: a lease not reported by ``min(overdue_in_ms, expires_in_ms)`` after its grant
  (a crashed worker's, or a live worker's still waiting for a slow send) is settled with
  ``pacing.settle_abandoned`` and the server's mark: the recipients past the mark go back to the
  backlog and are refunded to the lease's minute; those up to it stay charged (and are lost to
  the backlog, like the API's ``unknown``). The worker is presumed lost (no longer counted as
  running) and the conductor starts a replacement (after a cold start). A live worker's later
  report for that lease is refused and it stops (``false_alarms``).
- Conductor: every ``conductor_tick_ms``, whenever a worker exits and whenever a lease is
  abandoned, starts workers until
  ``workers_needed`` (at the mean measured rate of running workers) are running.

Minutes are provider minutes, indexed from the start of the run (time 0 is a minute boundary).
``SimResult.eligible`` marks full minutes with backlog throughout, except the first and last.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from sending import pacing, throttle

LATENCY_SIGMA = math.log(10) / 2.326

_CHECKIN = 0
_ABANDON = 1
_TICK = 2


@dataclass(frozen=True, slots=True)
class SimConfig:
    per_minute: int
    max_workers: int
    concurrency: int = 8
    batch_size: int = 100
    minutes: int = 10
    window_ms: int = 60_000
    guard_ms: int = 250
    spill_hold_ms: int = 5_000
    latency_median_ms: float = 40.0
    latency_sigma: float = LATENCY_SIGMA
    cold_start_ms: tuple[int, int] = (500, 2_000)
    response_latency_ms: tuple[int, int] = (2, 30)
    provider_skew_ms: int = 100
    worker_clock_skew_ms: int = 100
    crash_p: float = 0.0
    lifetime_minutes: float | None = 5.0
    backlog: int | None = None  # None: more than the cap can drain in the run
    conductor_tick_ms: int = 5_000
    # False: workers send no progress reports, so an abandoned lease is in doubt whole (for
    # comparison only; the protocol requires them).
    progress: bool = True
    seed: int = 0

    def limits(self) -> pacing.Limits:
        return pacing.Limits(
            per_minute=self.per_minute,
            batch_size=self.batch_size,
            max_workers=self.max_workers,
            concurrency=self.concurrency,
            guard_ms=self.guard_ms,
            window_ms=self.window_ms,
            spill_hold_ms=self.spill_hold_ms,
        )

    @property
    def end_ms(self) -> int:
        return self.minutes * self.window_ms


@dataclass(slots=True)
class SimResult:
    cap: int
    counts: np.ndarray  # arrivals per provider minute, index 0 .. minutes - 1
    eligible: np.ndarray  # bool per minute: full, backlog throughout, not first or last
    crash_minutes: set[int] = field(default_factory=set)
    crash_lease_minutes: list[int] = field(default_factory=list)  # one per crash
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def accepted(self) -> np.ndarray:
        return np.minimum(self.counts, self.cap)

    @property
    def over_cap_minutes(self) -> int:
        return int((self.counts > self.cap).sum())

    def utilization(self, *, of: float | None = None) -> np.ndarray:
        """Accepted / ``of`` (default: the cap) over eligible minutes."""
        return self.accepted[self.eligible] / float(of if of is not None else self.cap)

    def summary(self) -> dict[str, float | int]:
        util = self.utilization()
        return {
            "minutes": int(self.counts.size),
            "eligible_minutes": int(self.eligible.sum()),
            "over_cap_minutes": self.over_cap_minutes,
            "utilization_mean": float(util.mean()) if util.size else 0.0,
            "utilization_min": float(util.min()) if util.size else 0.0,
            "crashes": self.stats.get("crashes", 0),
            **{k: v for k, v in self.stats.items() if k != "crashes"},
        }


@dataclass(slots=True)
class _Worker:
    id: int
    clock_offset_ms: int
    dies_at_ms: int
    rate: float | None = None
    alive: bool = True
    presumed_lost: bool = False
    lease: pacing.LeaseTerms | None = None
    leases: int = 0


@dataclass(frozen=True, slots=True)
class _Payload:
    report: pacing.Tally
    busy_ms: int
    lease_no: int


@dataclass(frozen=True, slots=True)
class _Abandon:
    lease_no: int
    started_through: int  # the server's mark by then (the largest that arrived)
    crashed: bool


class _Run:
    def __init__(self, config: SimConfig) -> None:
        self.cfg = config
        self.limits = config.limits()
        self.rng = np.random.default_rng(config.seed)
        self.skew = float(self.rng.uniform(-config.provider_skew_ms, config.provider_skew_ms))
        self.window = config.window_ms
        self.counts = np.zeros(config.minutes + 2, dtype=np.int64)
        self.ledgers: dict[int, pacing.MinuteLedger] = {}
        self.open_size: dict[int, int] = {}
        self.backlog = (
            config.backlog
            if config.backlog is not None
            else config.per_minute * (config.minutes + 2) * 2 + config.batch_size
        )
        self.backlog_empty_at: int | None = None
        self.workers: dict[int, _Worker] = {}
        # Open leases by worker id: (their minute, when they fall due), for decide's refunds_due_ms.
        self.due: dict[int, tuple[int, int]] = {}
        self.heap: list[tuple[int, int, int, int, object]] = []
        self.seq = 0
        self.crash_minutes: set[int] = set()
        self.crash_lease_minutes: list[int] = []
        self.stats = dict.fromkeys(
            (
                "crashes",
                "grants",
                "waits",
                "stops",
                "workers_started",
                "crossed",
                "refunded",
                "abandoned",
                "false_alarms",
                "progress_reports",
                "in_doubt",
                "in_doubt_unsent",
                "max_in_doubt_unsent",
                "max_chunk",
            ),
            0,
        )
        self.log_mu = math.log(config.latency_median_ms)

    # -- helpers -------------------------------------------------------------------------------

    def push(self, at: int, kind: int, worker_id: int, payload: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, worker_id, payload))

    def one_way(self) -> int:
        low, high = self.cfg.response_latency_ms
        return int(self.rng.integers(low, high + 1))

    def ledger(self, start: int) -> pacing.MinuteLedger:
        return self.ledgers.get(start) or pacing.MinuteLedger(minute_start_ms=start)

    def running(self) -> int:
        return sum(1 for w in self.workers.values() if w.alive and not w.presumed_lost)

    def conductor(self, now: int) -> None:
        rates = [
            w.rate
            for w in self.workers.values()
            if w.alive and not w.presumed_lost and w.rate is not None
        ]
        needed = pacing.workers_needed(
            limits=self.limits,
            backlog=self.backlog,
            rate_per_worker_per_s=sum(rates) / len(rates) if rates else None,
        )
        for _ in range(needed - self.running()):
            low, high = self.cfg.cold_start_ms
            first_checkin = now + int(self.rng.integers(low, high + 1)) + self.one_way()
            lifetime = self.cfg.lifetime_minutes
            dies_at = first_checkin + int(lifetime * self.window) if lifetime else 2**62
            skew = self.cfg.worker_clock_skew_ms
            worker = _Worker(
                id=len(self.workers),
                # Same draws whatever the skew, so runs differing only in it are comparable.
                clock_offset_ms=round(float(self.rng.uniform(-1, 1)) * skew),
                dies_at_ms=dies_at,
            )
            self.workers[worker.id] = worker
            self.stats["workers_started"] += 1
            self.push(first_checkin, _CHECKIN, worker.id)

    def count_arrivals(self, arrivals: np.ndarray) -> None:
        if arrivals.size == 0:
            return
        minutes = np.floor_divide(arrivals + self.skew, self.window).astype(np.int64)
        low = int(minutes.min())
        binned = np.bincount(minutes - low)
        high = min(low + binned.size, self.counts.size)
        if high > low >= 0:
            self.counts[low:high] += binned[: high - low]

    def take_backlog(self, n: int, now: int) -> None:
        self.backlog -= n
        if self.backlog <= 0 and self.backlog_empty_at is None:
            self.backlog_empty_at = now

    def close_lease(self, lease: pacing.LeaseTerms, settlement: pacing.Settlement) -> None:
        start = lease.minute_start_ms
        self.ledgers[start], self.ledgers[start + self.window] = pacing.apply_settlement(
            lease_ledger=self.ledger(start),
            next_ledger=self.ledger(start + self.window),
            settlement=settlement,
        )
        if lease.may_cross:
            self.open_size[start] -= lease.size
        self.stats["crossed"] += settlement.crossed
        self.stats["refunded"] += settlement.refund

    # -- events --------------------------------------------------------------------------------

    def checkin(self, now: int, worker: _Worker, payload: _Payload | None) -> None:
        throttled = False
        if payload is not None and (worker.lease is None or payload.lease_no != worker.leases):
            # Its lease was settled as abandoned: the report is refused (409) and it stops. The
            # conductor started a replacement when the lease was abandoned.
            self.stats["false_alarms"] += 1
            worker.alive = False
            if now < self.cfg.end_ms:
                self.conductor(now)
            return
        if payload is not None and worker.lease is not None:
            settlement = pacing.settle(terms=worker.lease, tally=payload.report)
            self.close_lease(worker.lease, settlement)
            self.backlog += settlement.refund
            throttled = settlement.throttled > 0
            worker.rate = pacing.next_rate(
                worker.rate, settlement.sent + settlement.failed, payload.busy_ms
            )
            worker.lease = None
            self.due.pop(worker.id, None)
        if now >= self.cfg.end_ms or now >= worker.dies_at_ms:
            worker.alive = False
            if now < self.cfg.end_ms:
                self.conductor(now)
            return

        start = pacing.minute_start(now, self.window)
        due = [at for minute, at in self.due.values() if minute == start]
        decision = pacing.decide(
            now_ms=now,
            limits=self.limits,
            ledger=self.ledger(start),
            open_spill=self.open_size.get(start - self.window, 0),
            backlog=self.backlog,
            worker=pacing.WorkerView(rate_per_s=worker.rate),
            running_workers=self.running(),
            refunds_due_ms=min(due, default=None),
            # A throttled worker backs off (sending/throttle.py: 1 s without a Retry-After).
            hold_until_ms=now + throttle.BACKOFF_MS if throttled else None,
        )
        if isinstance(decision, pacing.Stop):
            self.stats["stops"] += 1
            worker.alive = False
            self.conductor(now)
        elif isinstance(decision, pacing.Wait):
            self.stats["waits"] += 1
            self.push(now + self.one_way() + decision.ms + self.one_way(), _CHECKIN, worker.id)
        else:
            self.grant(now, worker, decision)

    def grant(self, now: int, worker: _Worker, grant: pacing.Grant) -> None:
        self.stats["grants"] += 1
        self.ledgers[grant.minute_start_ms] = pacing.charge(
            self.ledger(now - now % self.window), grant
        )
        lease = pacing.LeaseTerms.from_grant(grant, self.limits)
        worker.leases += 1
        abandon_at = now + min(lease.overdue_in_ms, lease.expires_in_ms)
        self.due[worker.id] = (lease.minute_start_ms, abandon_at)
        if lease.may_cross:
            self.open_size[lease.minute_start_ms] = (
                self.open_size.get(lease.minute_start_ms, 0) + lease.size
            )
        worker.lease = lease
        self.take_backlog(grant.size, now)

        # The worker anchors its window on its own clock when the response reaches it.
        received = now + self.one_way()
        local_received = received + worker.clock_offset_ms
        first_start = local_received + grant.start_in_ms - worker.clock_offset_ms
        stop_starting = local_received + grant.stop_starting_in_ms - worker.clock_offset_ms

        n = grant.size
        latency = self.rng.lognormal(self.log_mu, self.cfg.latency_sigma, n)
        np.minimum(latency, self.cfg.spill_hold_ms, out=latency)
        if self.cfg.progress:
            chunk = pacing.progress_chunk(
                rate_per_s=worker.rate,
                concurrency=self.cfg.concurrency,
                per_minute=self.limits.per_minute,
            )
            chunks = -(-n // chunk)
            self.stats["max_chunk"] = max(self.stats["max_chunk"], min(chunk, n))
            low, high = self.cfg.response_latency_ms
            up = self.rng.integers(low, high + 1, chunks).tolist()
            down = self.rng.integers(low, high + 1, chunks).tolist()
            # First report: one check-in round trip (as the worker measured it) before the window.
            first_report = max(float(received), first_start - 2 * (received - now))
        else:  # one ungated chunk; the server never learns a mark
            chunk, up, down, first_report = max(n, self.cfg.concurrency), [0], [0], first_start
        starts_list, reports = _chunked_starts(
            latency.tolist(),
            float(first_start),
            self.cfg.concurrency,
            float(stop_starting),
            chunk,
            first_report,
            up,
            down,
            refused_from=float(abandon_at),
        )
        starts = np.array(starts_list)
        latency = latency[: starts.size]
        started = np.ones(starts.size, dtype=bool)
        crashed = self.rng.random() < self.cfg.crash_p
        crash_at = math.inf
        if crashed:
            nominal_end = float((starts + latency).max()) if starts.size else float(stop_starting)
            crash_at = self.rng.uniform(received, max(nominal_end, received + 1.0))
            started &= starts < crash_at
        done = starts[started] + latency[started]
        self.count_arrivals(done)
        n_started = int(done.size)
        # The server's mark at abandonment: the largest mark among reports sent before the crash
        # (all arrive before abandon_at, or _chunked_starts treated them as refused).
        sent_reports = [mark for sent_at, mark in reports if sent_at < crash_at]
        self.stats["progress_reports"] += len(sent_reports)
        mark = max(sent_reports, default=0) if self.cfg.progress else n
        self.push(abandon_at, _ABANDON, worker.id, _Abandon(worker.leases, mark, crashed))

        if crashed:
            self.stats["crashes"] += 1
            self.stats["in_doubt_unsent"] += mark - n_started
            self.stats["max_in_doubt_unsent"] = max(
                self.stats["max_in_doubt_unsent"], mark - n_started
            )
            # Minutes a crash can cost: its own, the one its lease may spill into, and those
            # until a replacement can have checked in.
            first = grant.minute_start_ms // self.window
            self.crash_lease_minutes.append(first)
            last = (
                abandon_at + self.cfg.cold_start_ms[1] + 2 * self.cfg.response_latency_ms[1]
            ) // self.window
            if lease.may_cross:
                last = max(last, first + 1)
            self.crash_minutes.update(range(first, last + 1))
            return
        finished = float(done.max()) if n_started else float(stop_starting)
        report = pacing.Tally(
            sent=n_started,
            not_started=n - n_started,
            done_ms=np.ceil(done - received).astype(np.int64).tolist(),
        )
        busy = math.ceil(finished - first_start)
        self.push(
            math.ceil(finished) + self.one_way(),
            _CHECKIN,
            worker.id,
            _Payload(report, busy, worker.leases),
        )

    def abandon(self, now: int, worker: _Worker, abandon: _Abandon) -> None:
        if worker.lease is None or worker.leases != abandon.lease_no:
            return  # reported in time
        settlement = pacing.settle_abandoned(
            terms=worker.lease, started_through=abandon.started_through
        )
        self.close_lease(worker.lease, settlement)
        self.stats["abandoned"] += 1
        self.stats["in_doubt"] += settlement.unknown
        worker.lease = None
        self.due.pop(worker.id, None)
        worker.presumed_lost = True
        if abandon.crashed:
            worker.alive = False
        self.backlog += settlement.refund
        if now < self.cfg.end_ms:
            self.conductor(now)

    def run(self) -> SimResult:
        self.conductor(0)
        self.push(self.cfg.conductor_tick_ms, _TICK, -1)
        while self.heap:
            now, _, kind, worker_id, payload = heapq.heappop(self.heap)
            if kind == _TICK:
                if now < self.cfg.end_ms:
                    self.conductor(now)
                    self.push(now + self.cfg.conductor_tick_ms, _TICK, -1)
            elif kind == _ABANDON:
                assert isinstance(payload, _Abandon)
                self.abandon(now, self.workers[worker_id], payload)
            else:
                assert payload is None or isinstance(payload, _Payload)
                self.checkin(now, self.workers[worker_id], payload)
        return self.result()

    def result(self) -> SimResult:
        minutes = self.cfg.minutes
        counts = self.counts[:minutes].copy()
        eligible = np.zeros(minutes, dtype=bool)
        eligible[1 : minutes - 1] = True
        if self.backlog_empty_at is not None:
            # Provider minute k may see sends up to the end of server minute k + 1.
            eligible[max(0, self.backlog_empty_at // self.window - 1) :] = False
        return SimResult(
            cap=self.cfg.per_minute,
            counts=counts,
            eligible=eligible,
            crash_minutes={m for m in self.crash_minutes if m < minutes},
            crash_lease_minutes=list(self.crash_lease_minutes),
            stats=dict(self.stats),
        )


def _chunked_starts(
    latency: list[float],
    first: float,
    slots: int,
    stop: float,
    chunk: int,
    first_report: float,
    up: list[int],
    down: list[int],
    *,
    refused_from: float,
) -> tuple[list[float], list[tuple[float, int]]]:
    """Start times of sends taken in order by ``slots`` threads from a shared queue, gated by
    progress reports (A6), and the reports as ``(sent_at, started_through)``.

    Chunk j is recipients ``[j * chunk, (j + 1) * chunk)``; its report is sent at
    ``first_report`` (j = 0) or when send ``j * chunk - min(slots, chunk)`` starts (the last
    ``slots`` sends of chunk j - 1, or its first send when a chunk is smaller than ``slots``, so
    only one report is outstanding at a time and the mark runs at most two chunks ahead of the
    starts), arrives ``up[j]`` later and is acknowledged ``down[j]`` after that; none of the
    chunk's sends starts before the acknowledgment. A report arriving at or after
    ``refused_from`` (the lease was settled by then) is refused and the worker starts nothing
    more. Stops at the first send that would start after ``stop`` (starts never decrease).
    """
    n = len(latency)
    free = [first] * min(slots, n)
    starts: list[float] = []
    reports: list[tuple[float, int]] = []
    lead = min(slots, chunk)

    def report(j: int, at: float) -> float:
        arrives = at + up[j]
        if arrives >= refused_from:
            return math.inf
        reports.append((at, min(n, (j + 1) * chunk)))
        return arrives + down[j]

    ack = report(0, first_report)
    next_ack = math.inf
    for i, took in enumerate(latency):
        if i and i % chunk == 0:
            ack = next_ack
        start = max(free[0], ack)
        if start > stop:
            break
        starts.append(start)
        heapq.heapreplace(free, start + took)
        ahead = i + lead
        if ahead % chunk == 0 and ahead < n:
            next_ack = report(ahead // chunk, start)
    return starts, reports


def simulate(config: SimConfig) -> SimResult:
    """Run the pacing core for one customer; see the module docstring for the model."""
    return _Run(config).run()


def simulate_baseline(config: SimConfig) -> SimResult:
    """Per-worker token bucket at cap / minute / workers, no windows, same latency/skew model.

    Every worker runs for the whole run after its cold start; its ``concurrency`` threads take
    sends from a shared queue, and each send first takes a token from the worker's bucket
    (capacity one token, refilled at ``per_minute / minute / max_workers``), as Celery's
    per-worker ``rate_limit`` does. Crashes and lifetimes are not modelled for the baseline.
    """
    rng = np.random.default_rng(config.seed + 1_000_003)
    window = config.window_ms
    skew = float(rng.uniform(-config.provider_skew_ms, config.provider_skew_ms))
    counts = np.zeros(config.minutes + 2, dtype=np.int64)
    interval = window * config.max_workers / config.per_minute
    end = float(config.end_ms)
    log_mu = math.log(config.latency_median_ms)
    sends = 0
    for _ in range(config.max_workers):
        low, high = config.cold_start_ms
        begin = float(rng.integers(low, high + 1))
        # Upper bound on sends: at the token rate for the whole run.
        n = int((end - begin) / interval) + 2
        latency = rng.lognormal(log_mu, config.latency_sigma, n)
        np.minimum(latency, config.spill_hold_ms, out=latency)
        starts = np.array(
            _bucket_starts(latency.tolist(), begin, config.concurrency, interval, end)
        )
        arrivals = starts + latency[: starts.size]
        sends += int(arrivals.size)
        minutes = np.floor_divide(arrivals + skew, window).astype(np.int64)
        minutes = minutes[(minutes >= 0) & (minutes < counts.size)]
        counts += np.bincount(minutes, minlength=counts.size)[: counts.size]
    minutes = config.minutes
    eligible = np.zeros(minutes, dtype=bool)
    eligible[1 : minutes - 1] = True
    return SimResult(
        cap=config.per_minute,
        counts=counts[:minutes].copy(),
        eligible=eligible,
        stats={"sends": sends},
    )


def _bucket_starts(
    latency: list[float], begin: float, slots: int, interval: float, end: float
) -> list[float]:
    """Start times under a shared queue of ``slots`` threads and a one-token bucket."""
    free = [begin] * slots
    level = 1.0  # tokens in the bucket at time ``last``
    last = begin
    starts: list[float] = []
    for took in latency:
        start = free[0]
        level = min(1.0, level + (start - last) / interval)
        if level < 1.0:
            start += (1.0 - level) * interval
            level = 1.0
        if start >= end:
            break
        level -= 1.0
        last = start
        starts.append(start)
        heapq.heapreplace(free, start + took)
    return starts
