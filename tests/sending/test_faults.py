"""Faults, end to end on PostgreSQL: a worker killed mid-batch, the conductor's process killed,
a provider answering 429 or 500 for a while.

Everything here is real except the length of a "minute": the worker API is served by uvicorn
(emailops.asgi, as in production), workers run the real handler (in threads, in child processes,
or inside a real Celery worker process), conductor ticks run `sending.conductor.tick`, and mail
goes to a real SandboxServer. The sandbox's clock runs 60_000 / SEND_WINDOW_MS times faster than
the wall clock and is aligned with it, so its calendar minute is exactly one of the engine's short
minutes: its per-minute cap (set to the customer's) then checks "no minute over the cap" at the
provider side, and its idempotency keys (the recipient ids) check "nobody got two emails".

Minutes are 4 s with a 1 s guard band, and a worker's API timeout is 1 s. A check-in answer that
arrives late on its first attempt shifts the worker's window by its lateness (an engine bug, shown
by `test_a_late_check_in_answer_does_not_move_its_window`); a retried answer's window is measured
from the first attempt. With the timeout no longer than the guard band, an answer is either late
by less than the guard or retried, so on a slow, loaded machine the other tests still measure the
engine's promises rather than that bug.

Every wait is bounded; the tests need PostgreSQL (and the Celery one Redis), so they fail under
CI=true without them.
"""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from django.db import connection
from django.db.models import F

from customers.models import SendLimit
from sending import checkin, conductor, services
from sending.clock import datetime_to_ms
from sending.models import ConductorLease, CustomerMinute, Lease, Message, Recipient
from sending.models import Worker as WorkerRow
from sending.runtimes import LocalRuntime, local_invocations
from sending.sandbox import Latency, SandboxServer
from sending.worker import LocalContext, handler
from tests.factories import API_KEY, make_message, sandbox_customer, start_worker

PROJECT_DIR = Path(__file__).resolve().parents[2]
TICK_S = 0.2
TERMINAL = set(Recipient.TERMINAL_STATUSES)
WINDOW_MS = 4_000
GUARD_MS = 1_000


@pytest.fixture
def fault_minutes(fast_minutes, settings):
    settings.SEND_WINDOW_MS = WINDOW_MS
    settings.SEND_TIMEOUT_MS = 1_000
    settings.SEND_MAX_ATTEMPTS = 3
    settings.WORKER_API_TIMEOUT_S = 1  # <= GUARD_MS: see the module docstring


# --- helpers ------------------------------------------------------------------------------------


def provider_clock(window_ms: int):
    """The sandbox's clock (epoch ms), sped up so that its calendar minute is one engine minute:
    both start at multiples of `window_ms` of wall-clock time."""
    assert 60_000 % window_ms == 0
    return lambda: time.time_ns() // 1_000_000 * 60_000 // window_ms


def provider_speed(window_ms: int) -> float:
    """How many of the sandbox's milliseconds pass in a real one (its Retry-After is real)."""
    return 60_000 / window_ms


def provider_ms(window_ms: int, real_ms: float) -> int:
    """A duration on the sandbox's clock."""
    return round(real_ms * 60_000 / window_ms)


def scaled_sandbox(settings, *, cap: int, latency_ms: float = 0) -> SandboxServer:
    return SandboxServer(
        caps={API_KEY: cap},
        clock=provider_clock(settings.SEND_WINDOW_MS),
        speed=provider_speed(settings.SEND_WINDOW_MS),
        latency=Latency(median_ms=latency_ms),
    ).start()


def set_limits(customer, **limits):
    SendLimit.objects.filter(customer=customer).update(guard_ms=GUARD_MS, **limits)


def in_doubt_of_expired_leases(customer) -> set[int]:
    """Recipients a reclaimed lease had announced as possibly started (they become unknown)."""
    ids = set()
    for lease in Lease.objects.filter(customer=customer, state=Lease.State.EXPIRED):
        ids |= set(lease.recipient_ids[: lease.started_through])
    return ids


def assert_unknown_only_where_in_doubt(message):
    """`unknown` is only ever the in-doubt part of a lease whose worker never reported."""
    unknown = set(
        Recipient.objects.filter(message=message, status=Recipient.Status.UNKNOWN).values_list(
            "pk", flat=True
        )
    )
    assert unknown <= in_doubt_of_expired_leases(message.customer)
    return unknown


def wait_until(predicate, *, timeout_s: float, every_s: float = 0.02, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(every_s)


def drive(customer, runtime, *, until, timeout_s: float, what: str = ""):
    """Run conductor ticks in this thread about every TICK_S until `until()` is true (checked
    every 10 ms in between); returns its value. Fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    next_tick = 0.0
    while True:
        now = time.monotonic()
        if now >= next_tick:
            conductor.tick(customer_id=customer.pk, runtime=runtime)
            next_tick = now + TICK_S
        value = until()
        if value:
            return value
        if now > deadline:
            counts = Counter(
                Recipient.objects.filter(message__customer=customer).values_list(
                    "status", flat=True
                )
            )
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {what or until}; recipients {counts}"
            )
        time.sleep(0.01)


def completed(message):
    return lambda: Message.objects.filter(pk=message.pk, status=Message.Status.COMPLETED).exists()


def assert_provider_saw_each_at_most_once(message, sandbox):
    """No duplicate at the provider; every `sent` recipient arrived there exactly once with the
    provider id it was recorded with; nothing arrived for a recipient not sent or in doubt."""
    report = sandbox.report()
    assert report["duplicates"] == {}, report["duplicates"]
    sends = sandbox.sends
    keys = Counter(s.idempotency_key for s in sends)
    assert not [k for k, n in keys.items() if n > 1], keys.most_common(3)
    by_key = {s.idempotency_key: s for s in sends}
    rows = {str(r.pk): r for r in Recipient.objects.filter(message=message)}
    assert set(by_key) <= set(rows), "the provider got mail for strangers"
    for key, row in rows.items():
        if row.status == Recipient.Status.SENT:
            assert key in by_key, f"recipient {key} is recorded sent but never arrived"
            assert row.provider_message_id == by_key[key].message_id
        elif key in by_key:
            assert row.status == Recipient.Status.UNKNOWN, (key, row.status)
    assert report["over_cap_minutes"] == {}, report["over_cap_minutes"]
    return by_key


def assert_ledger_within_cap(customer, cap: int):
    rows = CustomerMinute.objects.filter(customer=customer)
    over = [(r.minute_start, r.sent, r.cap) for r in rows if r.sent > cap]
    assert not over, over


# --- 1. a local worker killed mid-batch -----------------------------------------------------------


def test_a_worker_killed_mid_batch_is_replaced_and_nobody_gets_two_emails(
    api_url,
    fault_minutes,
    postgres,
    settings,
):
    settings.WORKER_API_URL = api_url
    cap = 40
    # 150 ms a send, two in flight: a batch takes a while, so the kill lands inside one.
    sandbox = scaled_sandbox(settings, cap=cap, latency_ms=150)
    try:
        customer = sandbox_customer(sandbox, per_minute=cap, batch_size=20, concurrency=2)
        set_limits(customer, max_workers=1)
        message = make_message(customer, 30)
        runtime = LocalRuntime(mode="process", timeout_s=30)

        def a_lease_half_started():
            """An open lease with sends at the provider and recipients not yet announced."""
            arrived = {s.idempotency_key for s in sandbox.sends}
            for lease in Lease.objects.filter(
                customer=customer, state=Lease.State.OPEN, started_through__gt=0
            ):
                started = {str(i) for i in lease.recipient_ids[: lease.started_through]}
                if arrived & started and lease.started_through < lease.size:
                    return lease
            return None

        lease = drive(
            customer, runtime, until=a_lease_half_started, timeout_s=30, what="sends under way"
        )
        (victim,) = [i for i in local_invocations() if i.worker_id == lease.worker_id]
        victim.process.send_signal(signal.SIGKILL)
        killed_at = sandbox.ledger.now_ms()
        assert victim.join(5) and victim.returncode == -signal.SIGKILL

        lease.refresh_from_db()
        assert lease.state == Lease.State.OPEN  # it never reported
        mark, ids = lease.started_through, lease.recipient_ids
        assert 0 < mark < len(ids)
        in_doubt, not_started = ids[:mark], ids[mark:]
        # Nothing past the announced mark ever reached the provider.
        assert {s.idempotency_key for s in sandbox.sends} & {str(i) for i in not_started} == set()

        drive(customer, runtime, until=completed(message), timeout_s=30, what="completion")

        lease.refresh_from_db()
        assert lease.state == Lease.State.EXPIRED
        assert WorkerRow.objects.get(pk=lease.worker_id).state == WorkerRow.State.LOST
        replacements = WorkerRow.objects.filter(customer=customer, pk__gt=lease.worker_id)
        assert replacements.filter(stop_reason="done").exists()

        status = dict(Recipient.objects.filter(message=message).values_list("id", "status"))
        assert set(status.values()) <= {Recipient.Status.SENT, Recipient.Status.UNKNOWN}
        # In doubt: never re-sent automatically.
        assert {status[i] for i in in_doubt} == {Recipient.Status.UNKNOWN}
        # Not started: sent later, by the replacement (or, should a replacement's own check-in
        # be too late, in doubt in its lease in turn: never lost, never sent twice).
        assert_unknown_only_where_in_doubt(message)
        later = [i for i in not_started if status[i] == Recipient.Status.SENT]
        assert later, "the replacement sent none of the killed worker's not-started recipients"

        by_key = assert_provider_saw_each_at_most_once(message, sandbox)
        assert all(by_key[str(i)].arrived_ms > killed_at for i in not_started if str(i) in by_key)
        assert_ledger_within_cap(customer, cap)
    finally:
        sandbox.stop()


# --- 2. the conductor's process killed ----------------------------------------------------------


def _database_url() -> str:
    db = connection.settings_dict  # the TEST database (pytest-django renamed it)
    auth = quote(db["USER"] or "", safe="")
    if db["PASSWORD"]:
        auth += ":" + quote(db["PASSWORD"], safe="")
    host = f"{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    return f"postgres://{auth}@{host}/{db['NAME']}"


def _dedicated(redis_url: str, db: int = 13) -> str:
    parts = urlsplit(redis_url)
    if parts.path.strip("/") == str(db):
        db += 1
    return urlunsplit(parts._replace(path=f"/{db}"))


class CeleryWorkers:
    """Real `celery -A emailops worker` processes on a dedicated Redis database."""

    def __init__(self, *, broker_url: str, env: dict, logs: Path):
        self.broker_url = broker_url
        self.env = env
        self.logs = logs
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, *, beat: bool = False) -> subprocess.Popen:
        command = [sys.executable, "-m", "celery", "-A", "emailops", "worker"]
        command += ["--pool", "threads", "-c", "2", "-l", "WARNING", "-n", f"{name}@%h"]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        if beat:
            # The watchdog on beat's schedule (WATCHDOG_S), as in production.
            command += ["-B", "--scheduler", "celery.beat:PersistentScheduler"]
            command += ["-s", str(self.logs / f"{name}-beat-schedule")]
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            command,
            cwd=PROJECT_DIR,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed with everything it started
        )
        log.close()
        self.processes.append(process)
        return process

    @staticmethod
    def kill(process: subprocess.Popen, sig=signal.SIGKILL) -> None:
        if process.poll() is None:
            os.killpg(process.pid, sig)
        process.wait(10)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    self.kill(process)

    def output(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text()[-3000:]}" for path in self.logs.glob("*.log")
        )


@pytest.fixture
def celery_workers(api_url, fault_minutes, postgres, redis_url, settings, tmp_path, monkeypatch):
    import redis

    from emailops.celery import app

    broker_url = _dedicated(redis_url)
    redis.Redis.from_url(broker_url).flushdb()
    settings.CONDUCTOR_LEASE_S = 3
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "REDIS_URL": broker_url,
        "CONN_MAX_AGE": "0",
        "CONDUCTOR_LEASE_S": "3",
        "CONDUCTOR_TICK_MS": "250",
        "WATCHDOG_S": "1",
        "SEND_WINDOW_MS": str(settings.SEND_WINDOW_MS),
        "SEND_TIMEOUT_MS": str(settings.SEND_TIMEOUT_MS),
        "SEND_MAX_ATTEMPTS": str(settings.SEND_MAX_ATTEMPTS),
        "WORKER_RUNTIME": "local",
        "LOCAL_WORKER_MODE": "thread",
        "LOCAL_WORKER_TIMEOUT_S": "30",
        "WORKER_API_URL": api_url,
        "WORKER_DEADLINE_MARGIN_MS": str(settings.WORKER_DEADLINE_MARGIN_MS),
        "WORKER_SEND_MARGIN_MS": str(settings.WORKER_SEND_MARGIN_MS),
        "WORKER_ANSWER_GUESS_MS": str(settings.WORKER_ANSWER_GUESS_MS),
        "WORKER_API_TIMEOUT_S": str(settings.WORKER_API_TIMEOUT_S),
        "WORKER_API_BACKOFF_MS": str(settings.WORKER_API_BACKOFF_MS),
        "LOG_LEVEL": "WARNING",
    }
    # This process enqueues on the same dedicated broker: Celery builds its connection pools
    # from the configured URL on first use, so they are dropped to be built again from this one
    # (and once more after the test, from the configured REDIS_URL).
    monkeypatch.setattr(app.conf, "broker_url", broker_url)
    _drop_broker_pools(app)
    workers = CeleryWorkers(broker_url=broker_url, env=env, logs=tmp_path)
    try:
        yield workers
    finally:
        workers.stop_all()
        _drop_broker_pools(app)
        redis.Redis.from_url(broker_url).flushdb()


def _drop_broker_pools(app) -> None:
    from kombu import pools

    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None
    # kombu keeps producer pools by broker URL across tests: a second test on the same dedicated
    # URL would get the first one's, over a closed connection pool.
    pools.reset()


def test_a_killed_conductor_process_is_replaced_within_seconds_and_the_send_goes_on(
    celery_workers, settings
):
    cap = 60
    sandbox = scaled_sandbox(settings, cap=cap, latency_ms=100)
    try:
        customer = sandbox_customer(sandbox, per_minute=cap, batch_size=15, concurrency=2)
        set_limits(customer, max_workers=3)
        message = make_message(customer, 120)
        Message.objects.filter(pk=message.pk).update(status=Message.Status.DRAFT, started_at=None)

        first = celery_workers.start("conductor-a")
        services.message_start(message_id=message.pk)  # kicks the conductor after commit

        heartbeats = set()

        def renewed_and_all_workers_busy():
            """The chain holds the lease and renews it, and a worker is in the middle of a batch
            (so the kill orphans a lease the new chain must reclaim). Workers waiting between
            batches die too; they are marked lost once they stay silent."""
            lease = ConductorLease.objects.filter(customer=customer).exclude(holder="").first()
            if lease is None:
                return None
            heartbeats.add((lease.holder, lease.heartbeat_at))
            live = WorkerRow.objects.filter(customer=customer, state__in=WorkerRow.LIVE_STATES)
            mid_batch = Lease.objects.filter(
                customer=customer,
                state=Lease.State.OPEN,
                started_through__gt=0,
                started_through__lt=F("size"),
            )
            renewals = {at for holder, at in heartbeats if holder == lease.holder}
            if len(renewals) >= 3 and sandbox.sends and live.exists() and mid_batch.exists():
                return lease
            return None

        try:
            held = wait_until(
                renewed_and_all_workers_busy,
                timeout_s=60,
                what="a renewing conductor, a worker mid-batch",
            )
        except AssertionError:
            print(celery_workers.output())
            raise
        celery_workers.kill(first)  # SIGKILL: the chain, its ticks and its worker threads
        killed = time.monotonic()
        killed_at = sandbox.ledger.now_ms()
        workers_before = set(
            WorkerRow.objects.filter(customer=customer).values_list("pk", flat=True)
        )
        orphaned = list(
            Lease.objects.filter(customer=customer, state=Lease.State.OPEN).values_list(
                "pk", flat=True
            )
        )
        assert orphaned

        celery_workers.start("conductor-b", beat=True)

        def taken_over():
            lease = ConductorLease.objects.get(customer=customer)
            return lease.holder not in ("", held.holder) and lease

        try:
            new = wait_until(taken_over, timeout_s=10, what="another conductor taking over")
        except AssertionError:
            print(celery_workers.output())
            raise
        assert time.monotonic() - killed < 10

        # The new chain ticks: it reclaims the dead workers' batches, starts new workers, and
        # they finish the message.
        try:
            # A worker that was waiting between batches is replaced once it is marked lost
            # (silent for a window, the send timeout and 10 s).
            wait_until(completed(message), timeout_s=60, every_s=0.1, what="completion")
        except AssertionError:
            print(celery_workers.output())
            raise
        # What the dead workers had out was settled: reclaimed by the new chain once expired (or
        # reported by a check-in that was already on its way to the API when they died).
        assert not Lease.objects.filter(customer=customer, state=Lease.State.OPEN).exists()
        assert Lease.objects.filter(pk__in=orphaned, state=Lease.State.EXPIRED).exists()
        assert WorkerRow.objects.filter(
            customer=customer, state=WorkerRow.State.LOST, pk__in=workers_before
        ).exists()
        successors = WorkerRow.objects.filter(customer=customer).exclude(pk__in=workers_before)
        assert successors.filter(stop_reason="done").exists()
        assert any(s.arrived_ms > killed_at for s in sandbox.sends), "nothing sent after the kill"
        assert ConductorLease.objects.get(customer=customer).holder in ("", new.holder)

        status = dict(Recipient.objects.filter(message=message).values_list("id", "status"))
        assert set(status.values()) <= {Recipient.Status.SENT, Recipient.Status.UNKNOWN}
        in_doubt = in_doubt_of_expired_leases(customer)
        assert {status[i] for i in in_doubt} == {Recipient.Status.UNKNOWN}
        assert_unknown_only_where_in_doubt(message)
        assert_provider_saw_each_at_most_once(message, sandbox)
        assert_ledger_within_cap(customer, cap)
    finally:
        sandbox.stop()


# --- 3. the provider answers 429 or 500 for a while ---------------------------------------------


@pytest.mark.parametrize("status", [429, 500])
def test_a_provider_failing_for_a_while_slows_the_send_and_loses_nothing(
    status,
    api_url,
    fault_minutes,
    postgres,
    settings,
):
    settings.WORKER_API_URL = api_url
    window_ms = settings.SEND_WINDOW_MS
    cap, n, concurrency, max_workers = 40, 100, 4, 3
    sandbox = scaled_sandbox(settings, cap=cap, latency_ms=20)
    try:
        customer = sandbox_customer(sandbox, per_minute=cap, batch_size=20, concurrency=concurrency)
        set_limits(customer, max_workers=max_workers)
        message = make_message(customer, n)
        runtime = LocalRuntime(mode="thread", timeout_s=40)

        drive(customer, runtime, until=lambda: len(sandbox.sends) >= 10, timeout_s=20, what="sends")
        # A minute of failures: at most two minutes' budget (80) is spent failing, fewer than the
        # 90 still queued, so no recipient is refused twice and every retry can succeed.
        fault_windows = 1
        duration = provider_ms(window_ms, fault_windows * window_ms)
        fault = sandbox.inject_fault(status, duration_ms=duration)
        in_force_from = sandbox.ledger.now_ms()  # every request arriving from now on sees it

        drive(customer, runtime, until=completed(message), timeout_s=45, what="completion")
        ours = set(WorkerRow.objects.filter(customer=customer).values_list("pk", flat=True))
        invocations = [i for i in local_invocations() if i.worker_id in ours]
        for invocation in invocations:
            assert invocation.join(10), f"worker {invocation.worker_id} is still running"

        # The provider refused everything while the fault lasted, and took mail again after.
        sends = sandbox.sends
        before = [s for s in sends if s.arrived_ms < fault.until_ms - duration]
        during = [s for s in sends if in_force_from < s.arrived_ms < fault.until_ms]
        after = [s for s in sends if s.arrived_ms >= fault.until_ms]
        report = sandbox.report()
        refused = report["faults"].get(str(status), 0)
        assert refused > 0 and not during, "the fault was not in force"
        assert len(before) < n and after, "the send did not resume after the fault"
        assert report["throttled"] == {}, "the provider's own cap refused something"

        # The engine saw it, in its ledger and in the workers' own summaries, and slowed down.
        minutes = CustomerMinute.objects.filter(customer=customer)
        summaries = [i.result for i in invocations if i.result]
        assert len(summaries) == len(invocations)
        if status == 429:
            assert sum(m.throttled for m in minutes) > 0
            assert sum(s["throttled"] for s in summaries) == refused
            # A throttled minute stops every worker until the next: a handful of 429s a minute
            # (what was in flight), not one per recipient.
            assert refused <= max_workers * concurrency * (fault_windows + 2)
        else:
            assert sum(m.failed for m in minutes) > 0
            assert sum(s["failed"] for s in summaries) == refused

        # Nothing lost, nothing twice. A 500 is a failed attempt, retried later (failed for good
        # only after SEND_MAX_ATTEMPTS); a 429 is no attempt at all.
        rows = list(Recipient.objects.filter(message=message))
        assert {r.status for r in rows} <= TERMINAL - {Recipient.Status.CANCELLED}
        failed = [r for r in rows if r.status == Recipient.Status.FAILED]
        assert all(r.attempts >= settings.SEND_MAX_ATTEMPTS for r in failed)
        assert_unknown_only_where_in_doubt(message)
        retried = [r for r in rows if r.attempts >= 2]
        assert all("Injected fault" in r.last_error for r in retried)
        if not Lease.objects.filter(customer=customer, state=Lease.State.EXPIRED).exists():
            # Every lease was reported: the books balance exactly.
            assert {r.status for r in rows} == {Recipient.Status.SENT}
            expected = n + (refused if status == 500 else 0)
            assert sum(r.attempts for r in rows) == expected
        if status == 500:
            assert retried
        by_key = assert_provider_saw_each_at_most_once(message, sandbox)
        assert {str(r.pk) for r in rows if r.status == Recipient.Status.SENT} <= set(by_key)
        assert_ledger_within_cap(customer, cap)
    finally:
        sandbox.stop()


# --- every database connection dropped mid-send --------------------------------------------------


def test_database_connections_dropped_mid_send_lose_nothing_and_keep_the_cap(
    api_url, fault_minutes, postgres, settings
):
    """What a PostgreSQL restart does to the worker API: its connections are cut in the middle of
    a send, again and again for 1.5 s (pg_terminate_backend; this test's own connection drives
    the conductor and is kept). Check-ins in flight fail, the workers retry, the send goes on:
    no minute over the cap at the provider, nobody mailed twice, nothing lost."""
    settings.WORKER_API_URL = api_url
    cap, n = 40, 120
    sandbox = scaled_sandbox(settings, cap=cap, latency_ms=20)
    try:
        customer = sandbox_customer(sandbox, per_minute=cap, batch_size=10, concurrency=2)
        set_limits(customer, max_workers=2)
        message = make_message(customer, n)
        runtime = LocalRuntime(mode="thread", timeout_s=60)
        drive(customer, runtime, until=lambda: len(sandbox.sends) >= 20, timeout_s=20, what="sends")
        # For 1.5 s every connection the API opens is cut (its requests open their own).
        dropped, until = 0, time.monotonic() + 1.5
        with connection.cursor() as cursor:
            while time.monotonic() < until:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                dropped += cursor.rowcount
                time.sleep(0.01)
        cut_at = len(sandbox.sends)
        assert dropped >= 1, "the worker API had no connection to cut"

        drive(customer, runtime, until=completed(message), timeout_s=60, what="completion")
        ours = set(WorkerRow.objects.filter(customer=customer).values_list("pk", flat=True))
        for invocation in [i for i in local_invocations() if i.worker_id in ours]:
            assert invocation.join(15), f"worker {invocation.worker_id} is still running"

        rows = list(Recipient.objects.filter(message=message))
        assert {r.status for r in rows} <= {Recipient.Status.SENT, Recipient.Status.UNKNOWN}
        assert_unknown_only_where_in_doubt(message)
        by_key = assert_provider_saw_each_at_most_once(message, sandbox)
        assert len(by_key) > cut_at, "nothing was sent after the connections were cut"
        assert_ledger_within_cap(customer, cap)
    finally:
        sandbox.stop()


# --- a check-in answer that arrives late ---------------------------------------------------------


def test_a_late_check_in_answer_does_not_move_its_window(
    api_url,
    postgres,
    settings,
    monkeypatch,
):
    settings.WORKER_API_TIMEOUT_S = 10  # the late answer needs no retry
    late_s = 2 * settings.SEND_WINDOW_MS / 1000
    sandbox = SandboxServer(caps={API_KEY: 100_000}).start()
    try:
        customer = sandbox_customer(sandbox, batch_size=10, concurrency=2)
        make_message(customer, 10)
        decide_and_answer = checkin.checkin
        stalled = []

        def stalls_after_deciding(**kwargs):
            answer = decide_and_answer(**kwargs)
            if answer["decision"] == "send" and not stalled:
                stalled.append(answer["batch"]["lease_id"])
                time.sleep(late_s)
            return answer

        monkeypatch.setattr(checkin, "checkin", stalls_after_deciding)
        _, event = start_worker(customer, api_url)
        handler(event, LocalContext(20))

        # The stalled answer came too late to use: its window had closed by the server's clock,
        # so the worker started none of it and handed it back; the recipients went out later,
        # under another lease.
        stalled_lease = Lease.objects.get(pk=stalled[0])
        assert stalled_lease.state == Lease.State.SETTLED
        assert stalled_lease.started_through == 0
        # Every send arrived inside the life of a lease that held its recipient: from the grant
        # to its expiry (last start + guard + the send timeout), which is what keeps it inside
        # its minute, or charged to the next.
        spans: dict[str, list[tuple[int, int]]] = {}
        for lease in Lease.objects.filter(customer=customer):
            span = (
                datetime_to_ms(lease.granted_at),
                datetime_to_ms(lease.expires_at),
            )
            for rid in lease.recipient_ids:
                spans.setdefault(str(rid), []).append(span)
        strays = [
            (s.idempotency_key, s.arrived_ms)
            for s in sandbox.sends
            if not any(a <= s.arrived_ms <= b for a, b in spans.get(s.idempotency_key, []))
        ]
        assert sandbox.sends and strays == []
    finally:
        sandbox.stop()
