"""Worker API benchmark: ``python -m bench.worker_api`` (PostgreSQL only).

Starts the ASGI server we ship (``uvicorn emailops.asgi:application --workers 2``) as a real
subprocess and drives it over HTTP with simulated workers, then measures the same claim + record
statements without HTTP, and a naive ORM version, on the same database.

Setup: ``DATABASE_URL=postgres://postgres@127.0.0.1:5432/emailops_bench_api``. The bench creates
that database if it is missing (through the server's ``postgres`` database), runs ``migrate``,
creates its own customers, messages and recipients, and deletes all of its rows at the end
(``VACUUM ANALYZE`` of the tables a check-in writes before and after, so runs start from the
same tables; each phase's recipients are inserted just before it and only ANALYZEd, not
vacuumed).

Phases
------
1. HTTP: two customers, each with ``SendLimit(per_minute=1_000_000, batch_size=500,
   max_workers=2, concurrency=16)`` and one message in status "sending". Four simulated workers
   (two per customer), each a thread with its own persistent ``http.client.HTTPConnection``,
   loop: check in -> on "send" report every recipient as sent at once (no sleeping; the report
   says the batch took ``batch / NOMINAL_WORKER_RATE`` seconds, so pacing sees a worker of that
   throughput), on "wait" sleep ``wait_ms``, on "stop" register a new worker and go on.
   ``WARMUP_S`` then ``DURATION_S`` seconds, or until the backlog is gone. Each customer has
   its own provider account (capped at 1,000,000/min); ``BENCH_ACCOUNTS=shared`` puts them on one,
   so their check-ins take the account's lock as well as their own.
2. Raw SQL: the same four threads, two customers, each on its own DB connection; each
   iteration is one transaction: ``queue.claim(limit=500)`` then ``queue.record(500 SENT)``.
3. Naive ORM: the same threads; each iteration is one transaction:
   ``select_for_update(skip_locked=True)`` of 500 queued recipients, then set status, provider
   id, attempts and sent_at on each and call ``.save()`` per row (a plain save of every field).
   A batch takes seconds here, so there is no warm-up and every batch counts, from the start
   until the last thread's last batch ends (``NAIVE_DURATION_S`` bounds when batches start).
4. Open loop (``bench.open_loop``; skipped with ``--no-open-loop``), on the same server right
   after phase 1: two more customers with ``max_workers=8`` and 16 simulated workers; check-ins
   arrive on a Poisson schedule at 25 %, 50 % and 75 % of the capacity phase 1 measured
   (check-ins per second), batch 500, each level 2 s warm-up + 40 s; a check-in's latency is
   measured from its scheduled arrival, so waiting for a free worker counts (no coordinated
   omission). ``--http-only`` skips phases 2 and 3.

Figures (last line, one JSON object)
------------------------------------
- ``recipients_per_s``: recipients reported as sent in check-ins answered with 200 inside the
  measured window, per second of wall time, all four workers together.
- ``checkin_p50_ms`` / ``checkin_p99_ms``: HTTP round trip (request written -> answer read) of
  the check-ins in the window that carried a 500-recipient report and got a 500-recipient batch.
- ``checkins``: check-ins answered in the window (all kinds).
- ``server_cpu_ms_per_checkin`` / ``db_cpu_ms_per_checkin``: CPU time of the uvicorn processes
  and of the database's client backends over the window (``/proc``), per check-in answered in
  it: what a check-in costs, robust to other load where the rate and latencies are not.
- ``capacity_checkins_per_s``: those check-ins per second, the open loop's 100 %.
- ``open_loop_p50_ms`` / ``open_loop_p99_ms``: ``{"25": ms, "50": ms, "75": ms}``, latency from
  the scheduled arrival of every check-in scheduled after a level's warm-up.
- ``raw_sql_recipients_per_s`` / ``naive_recipients_per_s``: as ``recipients_per_s``.
- ``ratio_to_raw_sql``: ``recipients_per_s / raw_sql_recipients_per_s``.
- ``nominal_worker_rate``: the per-worker provider throughput the reports claim (sends/s).
- ``wait_fraction``: time the workers spent sleeping on "wait" / (workers x window).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from cryptography.fernet import Fernet

from bench import open_loop, proc_cpu
from bench.support import delete_customers, ensure_database, insert_queued_recipients

NAN = float("nan")
BASE_DIR = Path(__file__).resolve().parent.parent

# --- workload -------------------------------------------------------------------------------
CUSTOMERS = 2
WORKERS_PER_CUSTOMER = 2
BATCH_SIZE = 500
# The provider throughput a simulated worker claims in its reports (sends per second). With it,
# pacing's pool sizing (workers_needed at the retire headroom 2.0) keeps both workers of a
# customer while its backlog is above 2,000 * 59.5 s / 2 = 59,500, and every grant is a full
# 500 (fits >= 500 whenever >= 278 ms of the window are left).
NOMINAL_WORKER_RATE = 2_000
DONE_MS = 20  # when the simulated provider answered each send, ms after the grant
WARMUP_S = 2.0
DURATION_S = 20.0
HTTP_RECIPIENTS_PER_CUSTOMER = 400_000
RAW_WARMUP_S = 1.0
RAW_DURATION_S = 8.0
RAW_RECIPIENTS_PER_CUSTOMER = 250_000
NAIVE_WARMUP_S = 0.0  # no warm-up: every row counts, until the last thread's last batch ends
NAIVE_DURATION_S = 5.0
NAIVE_RECIPIENTS_PER_CUSTOMER = 30_000
SERVER_START_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 30.0
SLUG_PREFIX = "bench-api-"
CHECKIN_PATH = "/api/worker/v1/checkin"
OPENAPI_PATH = "/api/worker/v1/openapi.yaml"


def _configure_environment() -> str:
    """Refuse anything but PostgreSQL; set the secrets shared with the server before setup."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://", "pgsql://")):
        sys.exit(
            "bench.worker_api needs PostgreSQL: set DATABASE_URL, e.g.\n"
            "  DATABASE_URL=postgres://postgres@127.0.0.1:5432/emailops_bench_api "
            "python -m bench.worker_api\n"
            f"(DATABASE_URL is {url!r})"
        )
    os.environ.setdefault("SECRET_KEY", "bench-worker-api-" + secrets.token_urlsafe(48))
    os.environ.setdefault(
        "WORKER_TOKEN_KEY", "bench-worker-api-tokens-" + secrets.token_urlsafe(48)
    )
    os.environ.setdefault("FIELD_ENCRYPTION_KEY", Fernet.generate_key().decode())
    os.environ.setdefault("UNSUBSCRIBE_KEY", secrets.token_urlsafe(48))
    os.environ.setdefault("ANYMAIL_WEBHOOK_SECRET", "bench:" + secrets.token_urlsafe(24))
    os.environ["DEBUG"] = "false"
    os.environ["ALLOWED_HOSTS"] = "127.0.0.1"
    os.environ["SECURE_SSL_REDIRECT"] = "false"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "emailops.settings")
    return url


# --- data -----------------------------------------------------------------------------------


def _create_customers(
    run_id: str, *, count: int = CUSTOMERS, max_workers: int = WORKERS_PER_CUSTOMER
) -> list[int]:
    """Each customer has its own provider account, or, with ``BENCH_ACCOUNTS=shared`` in the
    environment, they all share one (paced together under its lock)."""
    from customers.models import Customer, ProviderAccount, SendLimit

    separate = os.environ.get("BENCH_ACCOUNTS", "separate") != "shared"
    account = None
    ids = []
    for i in range(count):
        if account is None or separate:
            account = ProviderAccount.objects.create(
                name=f"{SLUG_PREFIX}{run_id}" + (f"-{i}" if separate else ""),
                kind=ProviderAccount.Kind.SANDBOX,
                credentials={"api_key": "bench-not-a-secret"},
                per_minute_cap=1_000_000,
            )
        slug = f"{SLUG_PREFIX}{run_id}-{i}"
        customer = Customer.objects.create(
            name=slug,
            slug=slug,
            default_from_email=f"news@{slug}.example",
            provider_account=account,
        )
        SendLimit.objects.create(
            customer=customer,
            per_minute=1_000_000,
            batch_size=BATCH_SIZE,
            max_workers=max_workers,
            concurrency=16,
        )
        ids.append(customer.pk)
    return ids


def _create_message(customer_id: int, n: int, *, status: str, label: str) -> int:
    """A message with n queued recipients, inserted by one INSERT ... SELECT generate_series."""
    from django.utils import timezone

    from sending.models import Message

    message = Message.objects.create(
        customer_id=customer_id,
        subject=f"Bench {label} {{{{ first_name }}}}",
        text_body="Hello {{ first_name }}, this is a benchmark message.",
        status=status,
        started_at=timezone.now(),
    )
    insert_queued_recipients(message.pk, n)
    return message.pk


# Every table a check-in writes. Each run leaves thousands of dead leases and worker versions;
# where autovacuum lags, they pile up across runs and every lease lookup walks them, so runs would
# not start from the same tables (docs/benchmarks.md).
VACUUMED_TABLES = (
    "sending_recipient",
    "sending_lease",
    "sending_worker",
    "sending_customerminute",
    "sending_message",
)


def _vacuum() -> None:
    """Reclaim the dead rows of earlier phases and runs, so each run starts from the same tables."""
    from django.db import connection

    with connection.cursor() as cursor:
        for table in VACUUMED_TABLES:
            cursor.execute(f"VACUUM ANALYZE {table}")


def _cleanup(customer_ids: list[int] | None = None) -> None:
    """Delete the bench's rows: these customers', or every bench customer's (stale runs)."""
    delete_customers(slug_prefix=SLUG_PREFIX, account_prefix=SLUG_PREFIX, customer_ids=customer_ids)


# --- measurement helpers --------------------------------------------------------------------


@dataclass
class Window:
    start: float
    end: float

    def __contains__(self, t: float) -> bool:
        return self.start <= t <= self.end

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


@dataclass
class WorkerStats:
    # (time the answer was read, recipients reported sent, round trip s, report n, batch n)
    checkins: list[tuple[float, int, float, int, int]] = field(default_factory=list)
    waits: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each sleep
    stops: dict[str, int] = field(default_factory=dict)
    workers_started: int = 0
    errors: list[str] = field(default_factory=list)
    exhausted_at: float | None = None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _num(value: float, digits: int) -> float | None:
    """A JSON-safe number: None when there was nothing to measure (NaN)."""
    return None if value != value else round(value, digits)


def _overlap(a: tuple[float, float], window: Window) -> float:
    return max(0.0, min(a[1], window.end) - max(a[0], window.start))


def _freeze_gc() -> None:
    """Keep this process's garbage collector off the measurements.

    The load generator has Django loaded (it registers workers and makes the data). Its full
    collections walk all of it and stall all four threads at once, a pause counted in their
    latencies (docs/benchmarks.md). The server does the same at start (emailops.asgi).
    """
    gc.collect()
    gc.freeze()


# --- phase 1: HTTP --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """uvicorn with two worker processes, started and stopped by this bench."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix="bench-uvicorn-", suffix=".log", delete=False
        )
        env = {
            **os.environ,
            "DEBUG": "false",
            "ALLOWED_HOSTS": "127.0.0.1",
            "SECURE_SSL_REDIRECT": "false",
        }
        self.command = [
            sys.executable,
            "-m",
            "uvicorn",
            "emailops.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "2",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        self.process = subprocess.Popen(
            self.command, cwd=BASE_DIR, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.process.returncode}:\n{self.tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", OPENAPI_PATH)
                response = conn.getresponse()
                response.read()
                conn.close()
                if response.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"uvicorn did not answer within {SERVER_START_TIMEOUT_S} s")

    def tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        log = self.tail()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)
        return log


def _http_worker(
    customer_id: int, port: int, deadline: float, stats: WorkerStats, max_checkins: int
) -> None:
    from django.db import connection

    from sending.checkin import worker_start

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    try:
        worker, token = worker_start(customer_id=customer_id)
        stats.workers_started += 1
        worker_id, seq, report = worker.pk, 1, None
        while time.monotonic() < deadline and len(stats.checkins) < max_checkins:
            # orjson: the simulated workers share the machine with the server, and the less CPU
            # they take, the more the figures measure the server.
            body = orjson.dumps(
                {
                    "worker_id": worker_id,
                    "seq": seq,
                    "request_id": f"bench-{worker_id}",
                    "report": report,
                }
            )
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
            t0 = time.monotonic()
            conn.request("POST", CHECKIN_PATH, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            t1 = time.monotonic()
            if response.status != 200:
                stats.errors.append(f"HTTP {response.status}: {data[:500]!r}")
                return
            answer = orjson.loads(data)
            reported = len(report["results"]) if report else 0
            token, seq, report = answer["token"], seq + 1, None
            decision = answer["decision"]
            granted = len(answer["batch"]["recipients"]) if decision == "send" else 0
            stats.checkins.append((t1, reported, t1 - t0, reported, granted))
            if decision == "send":
                report = open_loop.report_for(
                    answer["batch"], rate_per_s=NOMINAL_WORKER_RATE, done_ms=DONE_MS
                )
            elif decision == "wait":
                pause = min(answer["wait_ms"] / 1000, max(0.0, deadline - time.monotonic()))
                stats.waits.append((time.monotonic(), time.monotonic() + pause))
                time.sleep(pause)
            else:
                reason = answer.get("reason", "?")
                stats.stops[reason] = stats.stops.get(reason, 0) + 1
                if reason == "done":
                    stats.exhausted_at = t1
                    return
                worker, token = worker_start(customer_id=customer_id)
                stats.workers_started += 1
                worker_id, seq = worker.pk, 1
    except Exception as exc:  # reported in the summary, the run fails
        stats.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
        connection.close()


def run_http(customer_ids: list[int], open_loop_customers: list[int] | None = None) -> dict:
    for customer_id in customer_ids:
        _create_message(
            customer_id,
            HTTP_RECIPIENTS_PER_CUSTOMER,
            status="sending",
            label="http",
        )
    server = Server()
    _freeze_gc()
    try:
        server.wait_ready()
        begin = time.monotonic()
        deadline = begin + WARMUP_S + DURATION_S
        max_checkins = int((HTTP_RECIPIENTS_PER_CUSTOMER / BATCH_SIZE) * 2)
        all_stats = []
        threads = []
        for customer_id in customer_ids:
            for _ in range(WORKERS_PER_CUSTOMER):
                stats = WorkerStats()
                all_stats.append(stats)
                threads.append(
                    threading.Thread(
                        target=_http_worker,
                        args=(customer_id, server.port, deadline, stats, max_checkins),
                    )
                )
        for thread in threads:
            thread.start()
        # CPU per check-in of the server's processes and its database backends, over the
        # measured window (from /proc): robust to a shared machine where the rate is not.
        time.sleep(max(0.0, begin + WARMUP_S - time.monotonic()))
        server_pids, backends = proc_cpu.tree(server.process.pid), proc_cpu.database_backends()
        cpu_before = proc_cpu.cpu_s(server_pids), proc_cpu.cpu_s(backends)
        for thread in threads:
            thread.join()
        finished = time.monotonic()
        cpu_after = proc_cpu.cpu_s(server_pids), proc_cpu.cpu_s(backends)
        ended = min([finished] + [s.exhausted_at for s in all_stats if s.exhausted_at])
        window = Window(begin + WARMUP_S, min(deadline, ended))
        in_window = [c for s in all_stats for c in s.checkins if c[0] in window]
        capacity = len(in_window) / window.seconds if window.seconds else 0.0
        opened = (
            _run_open_loop(open_loop_customers, server.port, capacity)
            if open_loop_customers and capacity > 0
            else {}
        )
    finally:
        server_log = server.stop()
    sent = sum(c[1] for c in in_window)
    full = [c[2] * 1000 for c in in_window if c[3] == BATCH_SIZE and c[4] == BATCH_SIZE]
    everything = [c[2] * 1000 for c in in_window]
    waited = sum(_overlap(w, window) for s in all_stats for w in s.waits)
    stops: dict[str, int] = {}
    for s in all_stats:
        for reason, n in s.stops.items():
            stops[reason] = stops.get(reason, 0) + n
    return {
        "window_s": window.seconds,
        "recipients_per_s": sent / window.seconds if window.seconds > 0 else 0.0,
        "sent": sent,
        "checkins": len(in_window),
        "full_checkins": len(full),
        "p50": _percentile(full, 50),
        "p90": _percentile(full, 90),
        "p99": _percentile(full, 99),
        "max": max(full, default=float("nan")),
        "all_p50": _percentile(everything, 50),
        "all_p99": _percentile(everything, 99),
        "mean": statistics.fmean(full) if full else float("nan"),
        "wait_fraction": waited / (len(all_stats) * window.seconds) if window.seconds else 0.0,
        "waits": sum(len(s.waits) for s in all_stats),
        "stops": stops,
        "workers_started": sum(s.workers_started for s in all_stats),
        "errors": [e for s in all_stats for e in s.errors],
        "server_log": server_log.strip(),
        "per_worker": [len([c for c in s.checkins if c[0] in window]) for s in all_stats],
        "capacity_checkins_per_s": capacity,
        "server_cpu_ms": (cpu_after[0] - cpu_before[0]) * 1000 / max(1, len(in_window)),
        "db_cpu_ms": (cpu_after[1] - cpu_before[1]) * 1000 / max(1, len(in_window)),
        "open_loop": opened,
    }


def _run_open_loop(customer_ids: list[int], port: int, capacity: float) -> dict[str, dict]:
    """The open-loop levels (bench.open_loop) on the running server, each customer's message
    sized for them; the server is idle while the recipients are inserted."""
    per_customer = open_loop.recipients_needed(capacity)
    for customer_id in customer_ids:
        _create_message(customer_id, per_customer, status="sending", label="open")
    return open_loop.run(customer_ids, port, capacity)


# --- phases 2 and 3: without HTTP -----------------------------------------------------------


def _db_loop(step, message_id: int, customer_id: int, deadline: float, stats: WorkerStats):
    from django.db import connection

    try:
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            n = step(customer_id, message_id)
            t1 = time.monotonic()
            if n == 0:
                stats.exhausted_at = t1
                return
            stats.checkins.append((t1, n, t1 - t0, n, n))
    except Exception as exc:
        stats.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()


class _Cursor:
    """The message's keyset cursor, shared by its threads (as Message.claim_after is)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value = 0

    def get(self) -> int:
        with self.lock:
            return self.value

    def advance(self, to: int) -> None:
        with self.lock:
            self.value = max(self.value, to)


def _raw_step_factory():
    from django.conf import settings
    from django.db import transaction

    from sending import queue

    cursors: dict[int, _Cursor] = {}
    guard = threading.Lock()

    def step(customer_id: int, message_id: int) -> int:
        with guard:
            cursor = cursors.setdefault(message_id, _Cursor())
        with transaction.atomic():
            result = queue.claim(
                customer_id=customer_id,
                message_id=message_id,
                after_id=cursor.get(),
                limit=BATCH_SIZE,
            )
            cursor.advance(result.last_id)
            now_ms = time.time_ns() // 1_000_000
            queue.record(
                [
                    queue.StatusChange(
                        c.id,
                        queue.SENT,
                        provider_id=f"sim-{c.id}",
                        attempted=True,
                        sent_at_ms=now_ms,
                    )
                    for c in result.leased
                ],
                max_attempts=settings.SEND_MAX_ATTEMPTS,
            )
        return len(result.leased)

    return step


def _naive_step(customer_id: int, message_id: int) -> int:
    from django.db import transaction

    from sending.models import Recipient

    with transaction.atomic():
        batch = list(
            Recipient.objects.select_for_update(skip_locked=True)
            .filter(message_id=message_id, status=Recipient.Status.QUEUED)
            .order_by("id")[:BATCH_SIZE]
        )
        now = datetime.now(UTC)
        for recipient in batch:
            recipient.status = Recipient.Status.SENT
            recipient.provider_message_id = f"sim-{recipient.pk}"
            recipient.attempts += 1
            recipient.sent_at = now
            recipient.save()
    return len(batch)


def done_any(all_stats: list[WorkerStats]) -> bool:
    return any(s.checkins for s in all_stats)


def run_db_phase(
    customer_ids: list[int], step, *, per_customer: int, warmup: float, duration: float, label
):
    from sending.models import Message

    # Paused: these messages are invisible to check-ins; claim/record do not look at the status.
    messages = {
        customer_id: _create_message(
            customer_id, per_customer, status=Message.Status.PAUSED, label=label
        )
        for customer_id in customer_ids
    }
    _freeze_gc()
    begin = time.monotonic()
    deadline = begin + warmup + duration
    all_stats, threads = [], []
    for customer_id in customer_ids:
        for _ in range(WORKERS_PER_CUSTOMER):
            stats = WorkerStats()
            all_stats.append(stats)
            threads.append(
                threading.Thread(
                    target=_db_loop,
                    args=(step, messages[customer_id], customer_id, deadline, stats),
                )
            )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if warmup > 0:
        ended = min([deadline] + [s.exhausted_at for s in all_stats if s.exhausted_at])
    else:  # slow phases: count every batch, up to the end of the last one
        ended = max(c[0] for s in all_stats for c in s.checkins) if done_any(all_stats) else begin
    window = Window(begin + warmup, ended)
    in_window = [c for s in all_stats for c in s.checkins if c[0] in window]
    done = sum(c[1] for c in in_window)
    iterations = [c[2] * 1000 for c in in_window]
    return {
        "window_s": window.seconds,
        "recipients_per_s": done / window.seconds if window.seconds > 0 else 0.0,
        "recipients": done,
        "iterations": len(in_window),
        "p50": _percentile(iterations, 50),
        "p99": _percentile(iterations, 99),
        "errors": [e for s in all_stats for e in s.errors],
        "exhausted": any(s.exhausted_at for s in all_stats),
    }


def _print_open_loop(capacity: float, opened: dict[str, dict]) -> None:
    if not opened:
        return
    print(
        f"  open loop (Poisson arrivals, latency from the scheduled arrival; capacity "
        f"{capacity:.1f} check-ins/s saturated; {len(opened)} levels x "
        f"{open_loop.DURATION_S:.0f} s after {open_loop.WARMUP_S:.0f} s warm-up, "
        f"{open_loop.WORKERS_PER_CUSTOMER * CUSTOMERS} workers):"
    )
    for percent, level in opened.items():
        print(
            f"    {percent} % ({level['rate_per_s']:.1f}/s): p50 {_ms(level['p50'])}, "
            f"p99 {_ms(level['p99'])} over {level['checkins']} check-ins "
            f"({level['full']} of 500 in / 500 out: p50 {_ms(level['full_p50'])}, "
            f"p99 {_ms(level['full_p99'])}); server's hold before deciding p50 "
            f"{_ms(level['held_p50'])}, p99 {_ms(level['held_p99'])}; sent late "
            f"{level['late_starts']}; decisions {level['decisions']}; the load generator's CPU "
            f"{_ms(level['client_cpu_ms_per_checkin'])} a check-in"
        )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Worker API benchmark (PostgreSQL only).")
    parser.add_argument(
        "--no-open-loop", action="store_true", help="skip the open-loop levels (bench.open_loop)"
    )
    parser.add_argument(
        "--http-only", action="store_true", help="skip the raw SQL and naive ORM phases"
    )
    args = parser.parse_args(argv)
    _configure_environment()
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    ensure_database()
    call_command("migrate", verbosity=0, interactive=False)
    _cleanup()  # rows left by an interrupted earlier run
    _vacuum()
    run_id = datetime.now(UTC).strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)
    customer_ids: list[int] = []
    try:
        http_ids = _create_customers(run_id)
        customer_ids = list(http_ids)
        open_ids = []
        if not args.no_open_loop:
            open_ids = _create_customers(
                f"{run_id}-open",
                count=CUSTOMERS,
                max_workers=open_loop.WORKERS_PER_CUSTOMER,
            )
            customer_ids += open_ids
        t = time.monotonic()
        http = run_http(http_ids, open_ids)
        http_total_s = time.monotonic() - t
        raw = naive = None
        if not args.http_only:
            raw = run_db_phase(
                http_ids,
                _raw_step_factory(),
                per_customer=RAW_RECIPIENTS_PER_CUSTOMER,
                warmup=RAW_WARMUP_S,
                duration=RAW_DURATION_S,
                label="raw",
            )
            naive = run_db_phase(
                http_ids,
                _naive_step,
                per_customer=NAIVE_RECIPIENTS_PER_CUSTOMER,
                warmup=NAIVE_WARMUP_S,
                duration=NAIVE_DURATION_S,
                label="naive",
            )
    finally:
        if customer_ids:
            _cleanup(customer_ids)
            _vacuum()
        connection.close()

    raw_rate = raw["recipients_per_s"] if raw else 0.0
    ratio = http["recipients_per_s"] / raw_rate if raw_rate else 0.0
    opened = http["open_loop"]
    errors = [
        *http["errors"],
        *(raw["errors"] if raw else []),
        *(naive["errors"] if naive else []),
        *(e for level in opened.values() for e in level["errors"]),
    ]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"Worker API benchmark: PostgreSQL {connection.pg_version}, {os.cpu_count()} CPUs, "
        f"load average at the start {load_before}, at the end {load}"
    )
    print(
        f"  server: uvicorn --workers 2; {CUSTOMERS} customers x {WORKERS_PER_CUSTOMER} workers, "
        f"batch {BATCH_SIZE}, nominal worker rate {NOMINAL_WORKER_RATE:,}/s (reported, not slept)"
    )
    print(
        f"  HTTP: {http['recipients_per_s']:,.0f} recipients/s  ({http['sent']:,} sent in "
        f"{http['window_s']:.1f} s after {WARMUP_S:.0f} s warm-up; phase {http_total_s:.1f} s "
        "incl. setup)"
    )
    print(
        f"    check-ins: {http['checkins']:,} ({http['full_checkins']:,} with a 500 report and a "
        f"500 batch; per worker {http['per_worker']})"
    )
    print(
        f"    round trip, 500 in / 500 out: p50 {http['p50']:.1f} ms, p90 {http['p90']:.1f} ms, "
        f"p99 {http['p99']:.1f} ms, max {http['max']:.1f} ms, mean {http['mean']:.1f} ms"
    )
    print(
        f"    all check-ins: p50 {http['all_p50']:.1f} ms, p99 {http['all_p99']:.1f} ms; "
        f"waits {http['waits']} ({http['wait_fraction']:.1%} of worker time); "
        f"stops {http['stops'] or 'none'}; workers started {http['workers_started']}"
    )
    print(
        f"    CPU per check-in (from /proc, the window's check-ins): server (uvicorn, both "
        f"workers) {http['server_cpu_ms']:.2f} ms, PostgreSQL backends {http['db_cpu_ms']:.2f} ms"
    )
    if raw and naive:
        print(
            f"  raw SQL (claim 500 + record 500 per transaction, 4 threads): "
            f"{raw['recipients_per_s']:,.0f} recipients/s  ({raw['recipients']:,} in "
            f"{raw['window_s']:.1f} s; iteration p50 {raw['p50']:.1f} ms, p99 {raw['p99']:.1f} ms)"
        )
        print(
            f"  naive ORM (select_for_update(skip_locked) [:500] + .save() per row, 4 threads): "
            f"{naive['recipients_per_s']:,.0f} recipients/s  ({naive['recipients']:,} in "
            f"{naive['window_s']:.1f} s; iteration p50 {naive['p50']:.1f} ms)"
        )
    _print_open_loop(http["capacity_checkins_per_s"], opened)
    targets = [
        ("recipients_per_s >= 10,000", http["recipients_per_s"] >= 10_000),
        ("checkin_p99_ms <= 100", http["p99"] <= 100),
    ]
    if raw:
        targets.append(("recipients_per_s >= 0.5 x raw SQL", ratio >= 0.5))
    if "50" in opened and opened["50"]["p99"] is not None:
        targets.append(("open_loop_p99_ms at 50 % <= 75", opened["50"]["p99"] <= 75))
    if raw:
        print(f"  HTTP / raw SQL: {ratio:.2f}")
    print("  targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in targets))
    if http["server_log"]:
        print("  server log (tail):\n    " + http["server_log"][-2000:].replace("\n", "\n    "))
    if http["errors"]:
        raised = [
            line.strip()
            for line in http["server_log"].splitlines()
            if line and not line[0].isspace() and ("Error" in line or "Exception" in line)
        ]
        print(
            f"  HTTP PHASE FAILED: {len(http['errors'])} worker(s) stopped on an error"
            + (f"; the server raised: {raised[-1]}" if raised else "")
        )
    for error in errors[:10]:
        print(f"  ERROR: {error[:300]}")
    print(
        json.dumps(
            {
                "recipients_per_s": round(http["recipients_per_s"], 1),
                "checkin_p50_ms": _num(http["p50"], 2),
                "checkin_p99_ms": _num(http["p99"], 2),
                "checkins": http["checkins"],
                "server_cpu_ms_per_checkin": round(http["server_cpu_ms"], 2),
                "db_cpu_ms_per_checkin": round(http["db_cpu_ms"], 2),
                "open_loop_p50_ms": {k: _num(v["p50"] or NAN, 2) for k, v in opened.items()},
                "open_loop_p99_ms": {k: _num(v["p99"] or NAN, 2) for k, v in opened.items()},
                "capacity_checkins_per_s": round(http["capacity_checkins_per_s"], 2),
                "raw_sql_recipients_per_s": round(raw_rate, 1) if raw else None,
                "naive_recipients_per_s": round(naive["recipients_per_s"], 1) if naive else None,
                "ratio_to_raw_sql": round(ratio, 3),
                "nominal_worker_rate": NOMINAL_WORKER_RATE,
                "wait_fraction": round(http["wait_fraction"], 4) + 0.0,
                "server": "uvicorn --workers 2",
            }
        )
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
