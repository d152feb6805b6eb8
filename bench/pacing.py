"""Pacing benchmark: ``python -m bench.pacing``.

Simulates every cell of caps x max_workers with ``bench.simulator`` (virtual time), once with
the pacing core and once with the per-worker token-bucket baseline, and prints a table and, as
the last line, one JSON object.

Figures
-------
- ``customer_minutes``: simulated customer-minutes (all cells).
- ``over_cap_minutes``: provider minutes whose arrivals exceeded the cap (all minutes).
- ``utilization_mean`` / ``utilization_min``: accepted / cap over eligible minutes (full, backlog
  throughout, not the first or last of a run) of the cells that can carry the cap.
- "Can carry": a cell can carry its cap when the pacing core with that many workers, that
  concurrency and that batch size, run with no cap (so it only ever stops at the guarded window's
  edges), delivered at least the cap in EVERY eligible minute of a separate measuring run. For
  the other cells, ``cannot_carry`` gives accepted / that measured capacity (mean per minute).
  The baseline is held to the same capacity figures.
- ``crash_minutes`` and the ``*_excl_crash_minutes`` figures: minutes a simulated worker crash
  could have touched (the crash's minute, the next one if its lease could spill, and until a
  replacement could be checking in), counted separately so the effect of crashes is visible; the
  headline figures include them.
- ``minutes_below_0_99``: eligible minutes of the cells that can carry their cap with accepted /
  cap < 0.99; ``below_0_99`` lists them by cell with the largest progress chunk (``chunk``), 1%
  of the cap, the largest shortfall of a minute (``worst_short``) and the most in-doubt sends a
  crashed worker had declared but not started (``max_in_doubt_unsent``). A crash between a
  progress report and the starts it announced leaves what the mark ran ahead of the starts
  charged but never sent (``sending.pacing``, A6): at most about two chunks, ``2 * chunk - 1``
  sends, and a chunk is at most ``pacing.chunk_limit`` (0.4% of the cap, but two sends from
  120/min), so that stays under 1% of the cap from 300/min. At 60/min a chunk is one send, 1.7%
  of the cap: a minute with such a crash cannot reach 0.99. (The refund of what a crashed worker had
  not declared is used in its minute: workers waiting for budget come back when the first open
  lease of the minute falls due, see ``pacing.decide``'s ``refunds_due_ms``.)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

import numpy as np

from bench.simulator import SimConfig, SimResult, simulate, simulate_baseline

CAPS = (60, 600, 4_500, 60_000)
WORKERS = (1, 3, 5, 20)
CONCURRENCY = 8
BATCH_SIZE = {60: 5, 600: 25, 4_500: 150, 60_000: 500}
MINUTES = {60: 3_000, 600: 1_500, 4_500: 600, 60_000: 150}
CRASH_P = 0.001
LIFETIME_MINUTES = 5.0
CAPACITY_MINUTES = 6
UNCAPPED = 10**9


@dataclass
class Cell:
    cap: int
    workers: int
    config: SimConfig
    capacity_mean: float
    capacity_min: float
    ours: SimResult
    baseline: SimResult

    @property
    def can_carry(self) -> bool:
        return self.capacity_min >= self.cap


def run_cell(cap: int, workers: int, seed: int) -> tuple[Cell, float, float]:
    config = SimConfig(
        per_minute=cap,
        max_workers=workers,
        concurrency=CONCURRENCY,
        batch_size=BATCH_SIZE[cap],
        minutes=MINUTES[cap],
        crash_p=CRASH_P,
        lifetime_minutes=LIFETIME_MINUTES,
        seed=seed,
    )
    started = time.perf_counter()
    probe = simulate(
        replace(config, per_minute=UNCAPPED, minutes=CAPACITY_MINUTES, crash_p=0.0, seed=seed + 7)
    )
    capacity = probe.counts[probe.eligible]
    ours = simulate(config)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    baseline = simulate_baseline(config)
    baseline_s = time.perf_counter() - started
    cell = Cell(
        cap=cap,
        workers=workers,
        config=config,
        capacity_mean=float(capacity.mean()),
        capacity_min=float(capacity.min()),
        ours=ours,
        baseline=baseline,
    )
    return cell, ours_s, baseline_s


def figures(cells: list[Cell], pick: str, elapsed_s: float) -> dict[str, object]:
    carried, carried_clean, cannot, below = [], [], [], []
    for cell in cells:
        result: SimResult = getattr(cell, pick)
        if cell.can_carry:
            util = result.accepted / cell.cap
            carried.append(util[result.eligible])
            clean = result.eligible.copy()
            clean[sorted(result.crash_minutes)] = False
            carried_clean.append(util[clean])
            low = util[result.eligible] < 0.99
            if low.any():
                short = cell.cap - result.accepted[result.eligible]
                below.append(
                    {
                        "cap": cell.cap,
                        "workers": cell.workers,
                        "minutes": int(low.sum()),
                        "of_eligible": int(result.eligible.sum()),
                        "crashes": result.stats.get("crashes", 0),
                        "in_crash_minutes": int(
                            sum(
                                1
                                for m in np.flatnonzero(result.eligible)[low]
                                if int(m) in result.crash_minutes
                            )
                        ),
                        "chunk": result.stats.get("max_chunk", 0),
                        "one_percent_of_cap": cell.cap / 100,
                        "worst_short": int(short.max()),
                        "max_in_doubt_unsent": result.stats.get("max_in_doubt_unsent", 0),
                    }
                )
        else:
            of = result.accepted[result.eligible] / cell.capacity_mean
            cannot.append(
                {
                    "cap": cell.cap,
                    "workers": cell.workers,
                    "capacity_per_min": round(cell.capacity_mean),
                    "of_capacity_mean": round(float(of.mean()), 4),
                    "of_capacity_min": round(float(of.min()), 4),
                }
            )
    util = np.concatenate(carried)
    clean = np.concatenate(carried_clean)
    return {
        "customer_minutes": int(sum(getattr(c, pick).counts.size for c in cells)),
        "over_cap_minutes": int(sum(getattr(c, pick).over_cap_minutes for c in cells)),
        "utilization_mean": round(float(util.mean()), 5),
        "utilization_min": round(float(util.min()), 5),
        "eligible_minutes": int(util.size),
        "crash_minutes": int(util.size - clean.size),
        "utilization_mean_excl_crash_minutes": round(float(clean.mean()), 5),
        "utilization_min_excl_crash_minutes": round(float(clean.min()), 5),
        "minutes_below_0_99": int((util < 0.99).sum()),
        "below_0_99": below,
        "cannot_carry": cannot,
        "concurrency": CONCURRENCY,
        "elapsed_s": round(elapsed_s, 1),
    }


def row(cell: Cell) -> str:
    def part(result: SimResult) -> str:
        util = result.accepted[result.eligible] / cell.cap
        worst = result.counts.max() / cell.cap
        return f"{result.over_cap_minutes:>5} {util.mean():>7.4f} {util.min():>7.4f} {worst:>6.3f}"

    ours = cell.ours
    clean = ours.eligible.copy()
    clean[sorted(ours.crash_minutes)] = False
    clean_min = (ours.accepted[clean] / cell.cap).min()
    # Below 0.99 of the cap only means something for cells that can carry it.
    low = int((ours.accepted[ours.eligible] < 0.99 * cell.cap).sum()) if cell.can_carry else "-"
    return (
        f"{cell.cap:>6} {cell.workers:>3} {cell.config.batch_size:>5} {ours.counts.size:>5} "
        f"{cell.capacity_min:>8.0f} {'yes' if cell.can_carry else 'no':>5} | {part(ours)} "
        f"{clean_min:>7.4f} {ours.stats['crashes']:>4} {low:>4} | {part(cell.baseline)}"
    )


def main() -> None:
    started = time.perf_counter()
    cells: list[Cell] = []
    ours_s = baseline_s = 0.0
    for seed, (cap, workers) in enumerate((c, w) for c in CAPS for w in WORKERS):
        cell, spent_ours, spent_baseline = run_cell(cap, workers, seed=1_000 + seed)
        cells.append(cell)
        ours_s += spent_ours
        baseline_s += spent_baseline
    elapsed = time.perf_counter() - started

    print(
        f"pacing vs token-bucket baseline; concurrency {CONCURRENCY} per worker, crash p "
        f"{CRASH_P}/batch, worker lifetime {LIFETIME_MINUTES:g} min, guard 250 ms, provider skew "
        "+-100 ms, latency lognormal median 40 ms p99 400 ms"
    )
    print(
        "capacity = min sends/minute of the pacing core with no cap (same workers, concurrency, "
        "batch); util = accepted / cap over eligible minutes; worst = max count / cap"
    )
    print(
        f"{'cap':>6} {'wrk':>3} {'batch':>5} {'mins':>5} {'capacity':>8} {'carry':>5} | "
        f"{'over':>5} {'u_mean':>7} {'u_min':>7} {'worst':>6} {'u_min*':>7} {'crsh':>4} "
        f"{'<.99':>4} | "
        f"{'over':>5} {'u_mean':>7} {'u_min':>7} {'worst':>6}"
    )
    print(
        f"{'':>38} | {'ours (u_min* = excl. crash minutes; <.99 = minutes below)':<50} | baseline"
    )
    for cell in cells:
        print(row(cell))
    print(
        f"elapsed {elapsed:.1f} s (pacing incl. capacity runs {ours_s:.1f} s, "
        f"baseline {baseline_s:.1f} s)"
    )
    result = figures(cells, "ours", elapsed)
    result["baseline"] = figures(cells, "baseline", baseline_s)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
