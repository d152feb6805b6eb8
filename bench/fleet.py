"""What each sending customer costs: ``python -m bench.fleet`` (PostgreSQL + Redis; not in CI).

The production topology on this machine (``bench.harness``: uvicorn, Celery worker processes and
beat on Redis, PostgreSQL, the LOCAL runtime's workers as threads in the Celery processes, the
sandbox provider) with N customers sending at once — 10, 50 and 100 at 120/min each and 10 at
6,000/min — beside 1,000 customers that exist and send nothing. Each run measures
``--minutes`` full calendar minutes (3 by default) once every send has started.

Per run
-------
- ``over_cap_minutes``: customer-minutes the sandbox saw more attempts than the cap (whole run);
- ``utilization_min`` / ``utilization_mean``: accepted ÷ cap over every customer's measured full
  minutes (each customer has backlog throughout: checked at the end); ``short_customer_minutes``:
  the (at most ten) emptiest customer-minutes below the cap, with the ledger's row for each;
- ``ticks_per_s``: customer-ticks a second (a trigger records each ConductorLease heartbeat);
- ``tick_late_p95_ms``: p95 over customers of (time between two ticks of a customer - the tick
  interval CONDUCTOR_TICK_MS);
- ``statements_per_tick``: SQL statements the Celery processes sent ÷ customer-ticks;
  ``statements_per_checkin``: the web process's statements ÷ the check-ins it answered, and
  ``statements_per_worker_request``: ÷ check-ins and progress calls together
  (counted inside those processes, ``bench.fleet_probe``);
- ``cpu_s_per_customer_minute``: CPU seconds per sending customer per minute of the Celery
  processes (their simulated workers' threads excluded and shown apart as ``workers``), the web
  process and the PostgreSQL backends connected to the bench's database (``/proc``), and
  ``emailops_cores``: the three together in cores (target: at most 1 of the machine's 2);
- ``redis_ops_per_s``: commands a second at the bench's own Redis server (``INFO stats``).

``--noisy``: 20 customers at 120/min beside one with a 1,000,000-recipient backlog whose provider
(a sandbox of its own) answers 1 send in 20 after the send timeout: the 20's utilization.

Last line: ``{"fleet": {"10": {...}, ...}, "idle_customer_ticks": n, "noisy": {...}, ...}``;
a plot of the cost per customer against N goes to docs/fleet.png (``--plot``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time

from bench.e2e import Proc, _free_port, minute_key
from bench.harness import Fleet, FleetSpec, configure_environment, insert_recipients

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/emailops_fleet"
RUNS = {  # label: (customers, per_minute)
    "10": (10, 120),
    "50": (50, 120),
    "100": (100, 120),
    "10x6000": (10, 6000),
}
IDLE_CUSTOMERS = 1000
NOISY_RECIPIENTS = 1_000_000
PLOT = "docs/fleet.png"

TRIGGER_SQL = """
CREATE TABLE IF NOT EXISTS bench_fleet_ticks (customer_id bigint, holder text, at timestamptz);
CREATE OR REPLACE FUNCTION bench_fleet_tick() RETURNS trigger AS $$
BEGIN
    INSERT INTO bench_fleet_ticks VALUES (NEW.customer_id, NEW.holder, clock_timestamp());
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS bench_fleet_tick ON sending_conductorlease;
CREATE TRIGGER bench_fleet_tick AFTER INSERT OR UPDATE OF heartbeat_at
    ON sending_conductorlease FOR EACH ROW EXECUTE FUNCTION bench_fleet_tick();
TRUNCATE bench_fleet_ticks;
"""
DROP_SQL = """
DROP TRIGGER IF EXISTS bench_fleet_tick ON sending_conductorlease;
DROP FUNCTION IF EXISTS bench_fleet_tick();
DROP TABLE IF EXISTS bench_fleet_ticks;
"""


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _sql(script: str, params=None) -> list:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(script, params)
        return cursor.fetchall() if cursor.description else []


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


# --- the bench's own Redis, so INFO stats counts only the fleet ------------------------------


def start_redis() -> tuple[Proc, str]:
    port = _free_port()
    proc = Proc(
        "redis",
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
    )  # fmt: skip
    proc.wait_for_text("Ready to accept connections")
    return proc, f"redis://127.0.0.1:{port}/0"


def redis_commands(redis_url: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def clear_probes(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


def probes(redis_url: str) -> dict[int, dict]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = client.keys("fleet:probe:*")
        return {int(k.rsplit(b":", 1)[1]): json.loads(client.get(k)) for k in keys}
    finally:
        client.close()


# --- PostgreSQL backends of the bench's database, from /proc ----------------------------------


class BackendCpu(threading.Thread):
    """Every second: the CPU of each PostgreSQL backend connected to our database (other
    helpers' databases share the server), except the bench's own connections."""

    def __init__(self, exclude: set[int]):
        super().__init__(daemon=True, name="backend-cpu")
        self.exclude = exclude
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        from django.db import connection

        try:
            while not self.halt.is_set():
                rows = _sql(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid()"
                )
                for (pid,) in rows:
                    if pid in self.exclude:
                        continue
                    try:
                        with open(f"/proc/{pid}/stat") as stat:
                            fields = stat.read().rsplit(")", 1)[1].split()
                    except OSError:
                        continue
                    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                    self.first.setdefault(pid, cpu)
                    self.last[pid] = cpu
                self.halt.wait(1)
        finally:
            connection.close()

    def mark(self) -> dict[int, float]:
        return dict(self.last)

    def since(self, mark: dict[int, float]) -> float:
        return sum(cpu - mark.get(pid, self.first[pid]) for pid, cpu in self.last.items())


# --- customers ---------------------------------------------------------------------------------


def create_idle(prefix: str, n: int) -> list[int]:
    """Customers that exist, with limits and a finished message, and send nothing."""
    from customers.models import Customer, SendLimit

    customers = Customer.objects.bulk_create(
        Customer(name=f"Idle {i}", slug=f"{prefix}{i:04d}", default_from_email="a@idle.example")
        for i in range(n)
    )
    SendLimit.objects.bulk_create(SendLimit(customer=c, per_minute=120) for c in customers)
    return [c.pk for c in customers]


def spec_for(
    customers: int,
    per_minute: int,
    minutes: int,
    celery_workers: int,
    *,
    batch_size: int = 500,
    concurrency: int = 16,
    workers_in: str = "lambda",
) -> FleetSpec:
    # The send limits a new customer gets (SendLimit's defaults: batches of up to 500, 16 calls
    # in flight), one worker at 120/min and up to four at 6,000/min.
    return FleetSpec(
        customers=customers,
        per_minute=per_minute,
        recipients=per_minute * (minutes + 3),
        batch_size=batch_size,
        concurrency=concurrency,
        max_workers=4 if per_minute > 600 else 1,
        celery_workers=celery_workers,
        workers_in=workers_in,
        celery_app="bench.fleet_probe",
        asgi_app="bench.fleet_probe:application",
    )


def add_noisy(fleet: Fleet, sandbox_port: int, recipients: int) -> int:
    """One more customer, its provider a sandbox of its own; returns its id."""
    from django.db import connection

    from bench.harness import FleetCustomer
    from customers.models import Customer, ProviderAccount, SendLimit
    from sending.models import Message

    slug = f"{fleet.prefix}noisy"
    account = ProviderAccount.objects.create(
        name=slug,
        kind=ProviderAccount.Kind.SANDBOX,
        settings={"api_url": f"http://127.0.0.1:{sandbox_port}/"},
        credentials={"api_key": f"{slug}-key"},
        per_minute_cap=6000,
    )
    customer = Customer.objects.create(
        name="Noisy college", slug=slug, default_from_email=f"news@{slug}.example",
        provider_account=account,
    )  # fmt: skip
    SendLimit.objects.create(
        customer=customer, per_minute=6000, max_workers=4, batch_size=200, concurrency=16
    )
    message = Message.objects.create(customer=customer, subject="Noisy", text_body="x")
    insert_recipients(connection, message.pk, recipients)
    fleet.customers.append(FleetCustomer(customer.pk, message.pk, f"{slug}-key"))
    return customer.pk


def start_late_sandbox(fleet: Fleet, api_key: str) -> tuple[int, str]:
    """A sandbox answering 1 send in 20 after the send timeout: the LateAnswer knob if this
    sandbox has it (the message is accepted first), else a latency tail with a p95 of ~5 s."""
    import urllib.request

    from django.conf import settings

    from bench.e2e import _wait_http

    port = _free_port()
    proc = fleet._proc(
        "sandbox-late",
        [sys.executable, "-m", "sending.sandbox", "--port", str(port), "--cap",
         f"{api_key}=6000", "--latency-median-ms", "400"],
    )  # fmt: skip
    _wait_http(f"http://127.0.0.1:{port}/_sandbox/report", proc)
    delay_ms = settings.SEND_TIMEOUT_MS + 2000
    body = json.dumps({"fraction": 0.05, "delay_ms": delay_ms}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/_sandbox/late", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        urllib.request.urlopen(request, timeout=5).read()  # noqa: S310 - our sandbox
        return port, f"late answer: 5% after {delay_ms} ms"
    except Exception:
        proc.stop()
        fleet.procs.remove(proc)
    port = _free_port()
    proc = fleet._proc(
        "sandbox-late",
        [sys.executable, "-m", "sending.sandbox", "--port", str(port), "--cap",
         f"{api_key}=6000", "--latency-median-ms", "400", "--latency-p99-ms", "14500"],
    )  # fmt: skip
    _wait_http(f"http://127.0.0.1:{port}/_sandbox/report", proc)
    return port, "latency tail: median 400 ms, p99 14.5 s (~5% past 5 s)"


# --- one run -----------------------------------------------------------------------------------


def _short_minutes(report: dict, customers, keys: list[str], first: float, cap: int) -> list:
    """The measured customer-minutes the provider accepted fewer than the cap in (at most 10),
    each with what the engine's ledger says of that minute: where utilization went."""
    from sending.models import CustomerMinute

    short = []
    for c in customers:
        for i, k in enumerate(keys):
            accepted = report.get("accepted_per_minute", {}).get(c.api_key, {}).get(k, 0)
            if accepted < cap:
                short.append((c.customer_id, i, accepted))
    out = []
    for customer_id, i, accepted in sorted(short, key=lambda s: s[2])[:10]:
        row = (
            CustomerMinute.objects.filter(
                customer_id=customer_id, minute_start=_utc(first + 60 * i)
            )
            .values("granted", "refunded", "carried_in", "sent", "failed", "throttled")
            .first()
        )
        out.append({"customer": customer_id, "minute": i, "accepted": accepted, "ledger": row})
    return out


def _utc(epoch_s: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch_s, UTC)


def run(label: str, spec: FleetSpec, *, minutes: int, redis_url: str, noisy: bool = False) -> dict:
    from bench.e2e import _sandbox_report
    from sending.models import Recipient

    fleet = Fleet(spec)
    result: dict = {"customers": spec.customers, "per_minute": spec.per_minute}
    backends = None
    try:
        t0 = time.monotonic()
        fleet.create()
        noisy_id = None
        if noisy:
            noisy_key = f"{fleet.prefix}noisy-key"
            port, how = start_late_sandbox(fleet, noisy_key)
            noisy_id = add_noisy(fleet, port, NOISY_RECIPIENTS)
            result["noisy_provider"] = how
        print(f"[{label}] {len(fleet.customers)} customers made in "
              f"{time.monotonic() - t0:.0f} s; load {_load()}", flush=True)  # fmt: skip
        clear_probes(redis_url)
        fleet.start()
        _sql(TRIGGER_SQL)
        own = {pid for (pid,) in _sql("SELECT pg_backend_pid()")}
        backends = BackendCpu(own)
        backends.start()
        started = fleet.start_sends()
        first = math.ceil((started + 5) / 60) * 60
        end = first + minutes * 60
        print(f"[{label}] sending; measuring {minutes} full minutes from "
              f"{time.strftime('%H:%M:%S', time.gmtime(first))}", flush=True)  # fmt: skip
        while time.time() < first:
            fleet.check_alive()
            time.sleep(0.2)
        before = _snapshot(fleet, backends, redis_url)
        while time.time() < end:
            fleet.check_alive()
            time.sleep(0.5)
        after = _snapshot(fleet, backends, redis_url)
        time.sleep(2)
        report = _sandbox_report(fleet.sandbox_port)
        ids = [c.customer_id for c in fleet.customers if c.customer_id != noisy_id]
        normal = [c for c in fleet.customers if c.customer_id != noisy_id]
        keys = [minute_key(int((first + 60 * i) * 1000)) for i in range(minutes)]
        ratios = [
            report.get("accepted_per_minute", {}).get(c.api_key, {}).get(k, 0) / spec.per_minute
            for c in normal
            for k in keys
        ]
        over = sum(len(report.get("over_cap_minutes", {}).get(c.api_key, {})) for c in normal)
        short = _short_minutes(report, normal, keys, first, spec.per_minute)
        backlog_left = Recipient.objects.filter(
            message_id__in=[c.message_id for c in normal], status=Recipient.Status.QUEUED
        ).values("message_id").distinct().count()  # fmt: skip
        window_s = after["at"] - before["at"]
        ticks = _sql(
            "SELECT customer_id, extract(epoch FROM at) FROM bench_fleet_ticks"
            " WHERE at >= to_timestamp(%s) AND at <= to_timestamp(%s) ORDER BY 1, 2",
            [before["at"], after["at"]],
        )
        tick_ms = int(dict(spec.extra_env).get("CONDUCTOR_TICK_MS", spec.tick_ms))
        late = []
        for (c1, t1), (c2, t2) in itertools.pairwise(ticks):
            if c1 == c2 and c1 in set(ids):
                late.append(max(0.0, (float(t2) - float(t1)) * 1000 - tick_ms))
        normal_ticks = sum(1 for c, _ in ticks if c in set(ids))
        cpu = {k: after[k] - before[k] for k in ("celery", "workers", "web", "postgres")}
        customer_minutes = len(fleet.customers) * window_s / 60
        statements = after["celery_statements"] - before["celery_statements"]
        checkins = after["checkins"] - before["checkins"]
        progress = after["progress"] - before["progress"]
        result.update(
            {
                "over_cap_minutes": over,
                "utilization_min": round(min(ratios), 4) if ratios else None,
                "utilization_mean": round(sum(ratios) / len(ratios), 4) if ratios else None,
                "short_customer_minutes": short,
                "customers_without_backlog_at_end": len(normal) - backlog_left,
                "ticks_per_s": round(normal_ticks / window_s, 1),
                "tick_late_p95_ms": _round(_p95(late)),
                "statements_per_tick": _round(statements / max(normal_ticks, 1), 2),
                "statements_per_checkin": _round(
                    (after["web_statements"] - before["web_statements"]) / max(checkins, 1), 2
                ),
                "checkins_per_s": round(checkins / window_s, 1),
                "progress_calls_per_s": round(progress / window_s, 1),
                "statements_per_worker_request": _round(
                    (after["web_statements"] - before["web_statements"])
                    / max(checkins + progress, 1),
                    2,
                ),
                "cpu_s_per_customer_minute": {
                    k: round(v / customer_minutes, 4) for k, v in cpu.items()
                },
                "emailops_cores": round(
                    (cpu["celery"] + cpu["web"] + cpu["postgres"]) / window_s, 3
                ),
                "cores": {k: round(v / window_s, 3) for k, v in cpu.items()},
                "redis_ops_per_s": round((after["redis"] - before["redis"]) / window_s),
                "measured_s": round(window_s, 1),
                "celery_workers": spec.celery_workers,
                "load_avg": _load(),
            }
        )
        per_minute_cpu = result["cpu_s_per_customer_minute"]
        # At the measured cost, if CPU is the limit: one Celery process uses one core at most
        # (one GIL), PostgreSQL's backends one core each.
        result["customers_per_celery_process"] = (
            round(60 / per_minute_cpu["celery"]) if per_minute_cpu["celery"] else None
        )
        result["customers_per_postgres_core"] = (
            round(60 / per_minute_cpu["postgres"]) if per_minute_cpu["postgres"] else None
        )
        result["celery_cores_by_process"] = [
            round((after["own"][pid] - before["own"].get(pid, 0)) / window_s, 3)
            for pid in sorted(after["own"])
        ]
        result["conductor_tasks_per_s_by_process"] = [
            round((after["tasks"][pid] - before["tasks"].get(pid, 0)) / window_s, 1)
            for pid in sorted(after["tasks"])
        ]
        if noisy_id is not None:
            result["noisy_sent"] = Recipient.objects.filter(
                message__customer_id=noisy_id, status=Recipient.Status.SENT
            ).count()
            result["noisy_unknown"] = Recipient.objects.filter(
                message__customer_id=noisy_id, status=Recipient.Status.UNKNOWN
            ).count()
        return result
    except Exception:
        for proc in fleet.procs:
            print(f"--- {proc.name} (last lines)\n{proc.tail(2000)}", file=sys.stderr)
        raise
    finally:
        if backends is not None:
            backends.halt.set()
            backends.join(5)
        fleet.stop()
        _sql(DROP_SQL)
        fleet.delete()


def _snapshot(fleet: Fleet, backends: BackendCpu, redis_url: str) -> dict:
    at = time.time()
    celery_pids = {p.process.pid for p in fleet.procs if p.name.startswith("celery-worker")}
    web_pids = {p.process.pid for p in fleet.procs if p.name == "uvicorn"}
    found = probes(redis_url)
    celery = [v for pid, v in found.items() if pid in celery_pids]
    web = [v for pid, v in found.items() if pid in web_pids]
    if len(celery) != len(celery_pids) or len(web) != 1:
        raise RuntimeError(f"probes missing: {sorted(found)} for celery {sorted(celery_pids)}")
    in_celery = sum(v["worker_threads_cpu_s"] for v in celery)
    return {
        "at": at,
        "celery": fleet.cpu_s("celery-worker") - in_celery,
        # Simulated workers: threads in the Celery processes, or the Lambda stand-in's process.
        "workers": in_celery + fleet.cpu_s("lambda-local"),
        "web": fleet.cpu_s("uvicorn"),
        "postgres": backends.since({}),
        "celery_statements": sum(v["statements"] for v in celery),
        "web_statements": web[0]["statements"],
        "checkins": web[0]["checkins"],
        "progress": web[0].get("progress", 0),
        "tasks": {pid: v["conductor_tasks"] for pid, v in found.items() if pid in celery_pids},
        "own": {
            pid: v["cpu_s"] - v["worker_threads_cpu_s"]
            for pid, v in found.items()
            if pid in celery_pids
        },
        "redis": redis_commands(redis_url),
    }


def _round(value, digits: int = 1):
    return None if value is None else round(value, digits)


# --- the curve ---------------------------------------------------------------------------------


def _cost_rows(results: dict) -> list[tuple[int, dict]]:
    return sorted(
        (r["customers"], r["cpu_s_per_customer_minute"])
        for r in results.values()
        if r.get("per_minute") == 120 and "cpu_s_per_customer_minute" in r
    )


def plot(results: dict, path: str, title: str, baseline: dict | None = None) -> None:
    """CPU seconds per sending customer-minute against N, by process; with `baseline` (an
    earlier run's ``fleet`` figures) its Celery cost as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _cost_rows(results)
    if not rows:
        return
    xs = [n for n, _ in rows]
    fig, (ax, util) = plt.subplots(
        1, 2, figsize=(11, 4.2), dpi=110, gridspec_kw={"width_ratios": [3, 2]}
    )
    series = {
        "celery": "Celery (conductors)",
        "web": "web (check-ins)",
        "postgres": "PostgreSQL",
        "workers": "simulated workers (Lambda in production)",
    }
    for key, label in series.items():
        ax.plot(xs, [c[key] for _, c in rows], marker="o", label=label)
    ax.plot(
        xs,
        [c["celery"] + c["web"] + c["postgres"] for _, c in rows],
        marker="s", color="black", label="EmailOps total (Celery + web + PostgreSQL)",
    )  # fmt: skip
    if baseline:
        before = _cost_rows(baseline)
        ax.plot(
            [n for n, _ in before],
            [c["celery"] for _, c in before],
            marker="o", color="grey", linestyle="--",
            label="Celery (conductors), before: a chain per customer",
        )  # fmt: skip
    ax.set_xlabel("customers sending at once (120/min each)")
    ax.set_ylabel("CPU seconds per customer-minute")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    # A starved fleet costs less per customer-minute because it does less: read the cost
    # beside the utilization it bought.
    for figures, style, label in ((results, "-", "now"), (baseline or {}, "--", "before")):
        points = sorted(
            (r["customers"], r["utilization_min"])
            for r in figures.values()
            if r.get("per_minute") == 120 and r.get("utilization_min") is not None
        )
        if points:
            util.plot(*zip(*points, strict=True), marker="o", linestyle=style, label=label)
    util.axhline(0.99, color="green", linewidth=0.8, label="target 0.99")
    util.set_xlabel("customers sending at once (120/min each)")
    util.set_ylabel("utilization min (accepted ÷ cap, full minutes)")
    util.set_ylim(0, 1.05)
    util.grid(alpha=0.3)
    util.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _baseline(path: str | None) -> dict | None:
    if not path:
        return None
    with open(path) as f:
        return json.loads(f.read().strip().splitlines()[-1])["fleet"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--only", action="append", choices=sorted(RUNS), help="run only these")
    parser.add_argument("--minutes", type=int, default=3, help="full minutes measured per run")
    parser.add_argument("--idle", type=int, default=IDLE_CUSTOMERS, help="idle customers")
    parser.add_argument("--celery-workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--noisy", action="store_true", help="also the noisy-neighbour run")
    parser.add_argument("--batch-size", type=int, default=500, help="the fleet's batch size")
    parser.add_argument(
        "--workers-in",
        choices=("lambda", "celery"),
        default="lambda",
        help="simulated workers in bench.lambda_local's process (invoked by the Lambda runtime)"
        " or as threads in the Celery processes",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight a worker")
    parser.add_argument("--no-fleet", action="store_true", help="skip the N runs (with --noisy)")
    parser.add_argument("--plot", default=None, help=f"write the curve here (e.g. {PLOT})")
    parser.add_argument(
        "--baseline", default=None, help="an earlier run's last line (JSON), drawn dashed"
    )
    parser.add_argument(
        "--plot-from", default=None, help="no runs: draw --plot from a run's last line (JSON)"
    )
    args = parser.parse_args(argv)
    if args.plot_from:
        with open(args.plot_from) as f:
            out = json.loads(f.read().strip().splitlines()[-1])
        title = f"bench.fleet, {out.get('date', '')} at {out.get('commit', '')}"
        plot(out["fleet"], args.plot or PLOT, title, _baseline(args.baseline))
        return 0
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_proc, redis_url = start_redis()
    try:
        conf = configure_environment(database_url=database_url, redis_url=redis_url)
        print(f"bench.fleet: load average at start {conf['load']} ({os.cpu_count()} cores)",
              flush=True)  # fmt: skip
        from bench.support import delete_customers

        prefix = f"bench-fleet-idle-{os.getpid()}-"
        idle_ids = create_idle(prefix, args.idle)
        out: dict = {"fleet": {}}
        try:
            labels = [] if args.no_fleet else (args.only or list(RUNS))
            for label in labels:
                n, per_minute = RUNS[label]
                spec = spec_for(
                    n, per_minute, args.minutes, args.celery_workers,
                    batch_size=args.batch_size, concurrency=args.concurrency,
                    workers_in=args.workers_in,
                )  # fmt: skip
                out["fleet"][label] = run(label, spec, minutes=args.minutes, redis_url=redis_url)
                print(f"[{label}] {json.dumps(out['fleet'][label])}", flush=True)
            if args.noisy:
                spec = spec_for(
                    20, 120, args.minutes, args.celery_workers,
                    batch_size=args.batch_size, concurrency=args.concurrency,
                    workers_in=args.workers_in,
                )  # fmt: skip
                out["noisy"] = run(
                    "noisy", spec, minutes=args.minutes, redis_url=redis_url, noisy=True
                )
                print(f"[noisy] {json.dumps(out['noisy'])}", flush=True)
            idle_ticks = _sql(
                "SELECT count(*) FROM sending_conductorlease WHERE customer_id = ANY(%s)",
                [idle_ids],
            )[0][0]
            out["idle_customer_ticks"] = idle_ticks
        finally:
            delete_customers(slug_prefix=prefix, account_prefix=prefix)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if args.plot and out["fleet"]:
            title = f"bench.fleet, {time.strftime('%Y-%m-%d')} at {commit}"
            plot(out["fleet"], args.plot, title, _baseline(args.baseline))
        out.update(
            date=time.strftime("%Y-%m-%d"),
            idle_customers=args.idle,
            minutes=args.minutes,
            commit=commit,
            database=conf["database"],
            load_avg_start=conf["load"],
            load_avg=_load(),
        )
        print(json.dumps(out), flush=True)
        return 0
    finally:
        redis_proc.stop()


if __name__ == "__main__":
    sys.exit(main())
