"""End-to-end benchmark with real processes: ``python -m bench.e2e`` (PostgreSQL + Redis).

Not part of CI. It runs the production shape on this machine and measures at the provider:

- the web API: ``uvicorn emailops.asgi:application --workers 2``;
- a Celery worker (``celery -A emailops worker --pool threads --concurrency 8 -Q celery``) and
  Celery beat (``celery -A emailops beat``, the DatabaseScheduler from settings) on Redis;
- workers started by the conductor through the local runtime in PROCESS mode
  (``WORKER_RUNTIME=local``, ``LOCAL_WORKER_MODE=process``, ``LOCAL_WORKER_TIMEOUT_S=120``), set in
  the Celery worker's environment; they reach the worker API at ``WORKER_API_URL``;
- the sandbox provider (``python -m sending.sandbox --cap KEY=CAP ...``) as its own process, its
  caps equal to each account's ``per_minute_cap`` and enforced by the sandbox itself, on its own
  clock, independently of our SendLimit;
- PostgreSQL (database ``emailops_bench_e2e`` on 127.0.0.1:5432, user postgres; created and
  migrated if missing) and Redis (``redis://127.0.0.1:6379/5``, flushed at start and at the end).

Every subprocess is started in a session of its own and its whole process group is terminated at
the end (SIGTERM, then SIGKILL), whatever happens; the bench's rows are deleted at the end.

Workload
--------
Three customers with caps of 600, 1,200 and 6,000 a minute (``SendLimit.per_minute`` = the
sandbox account's ``per_minute_cap``), ``max_workers=5`` (``--max-workers 1,1,2`` sets it per
customer), ``concurrency=16``, ``guard_ms=250`` and ``batch_size`` 100 / 200 / 500. Each has
one message with ``4.5 x cap`` recipients: at least three FULL minutes of backlog whichever
second the send starts in. The three messages are started with ``sending.services.message_start``
one after the other (well under a second apart); the conductor chains and beat's watchdog take it
from there. The run ends when all three messages
are completed, or at the time limit (7 minutes).

Baseline
--------
What a Django user would build instead: one Celery task per email with ``rate_limit``, two
worker processes. ``baseline_app`` below is a Celery app of its own in this module (run as
``celery -A bench.e2e:baseline_app worker``), with one task per customer (Celery rate limits are
per task type and per worker instance), each ``rate_limit = cap/2`` per minute (the cap split over
the two workers), routed to a queue per customer. Each task loads its recipient, renders the
message with the same rendering code, sends it through the SAME provider code
(``sending.providers.open_provider``, the recipient id as idempotency key) to the sandbox under a
fresh API key per customer (so its counts are separate), and records the outcome on the
recipient row (sent, or failed with the provider's error, including 429s; a task that raises
leaves its recipient queued). The same three caps and recipient counts; the tasks are enqueued
(interleaved across customers) before the two workers are launched, and the run's clock starts
at their launch; it runs for the same duration as our run took (or until every recipient is
terminal). The baseline workers run Celery's default pool, ``--pool prefork --concurrency 4``
each (``--baseline-pool threads``: ``--pool threads --concurrency 8``), with
``worker_prefetch_multiplier=1`` (as the project's own Celery settings). What Celery's rate
limiting released with either pool is in docs/benchmarks.md; it was not tuned further.

``--burst-baseline`` adds a second baseline, a burst at every minute's start (bench/burst.py),
with the sandbox's clock 300 ms behind ours for the whole run.

Measurements (at the sandbox: ``GET /_sandbox/report``, per API key, per calendar minute)
---------------------------------------------------------------------------------------
- ``over_cap_minutes``: customer-minutes in which MORE SENDS WERE ATTEMPTED than the cap
  (accepted + refused with 429), the sandbox's own ``over_cap_minutes``. The sandbox enforces its
  cap, so its accepted count alone can never exceed it; a request past the cap is what a real
  provider would count against the account. Accepted counts above the cap are checked as well
  (always 0 by construction) and printed.
- ``duplicates``: the sandbox's count of repeated idempotency keys (recipient ids), summed.
- ``lost``: recipients of the run's messages still ``queued`` or ``leased`` in the database at
  the end (``unknown`` is terminal). For the baseline this includes tasks that never ran before
  the end (still in the broker): they are not done, which is what this key measures.
- ``utilization_min``: the minimum over customers, and over that customer's ELIGIBLE minutes, of
  accepted ÷ cap. Eligible: a calendar minute with sends that is not the customer's first minute
  with sends (partial), not its last minute with sends, and throughout which it had backlog: the
  customer's queued recipients, sampled from the database every 0.5 s, were > 0 in every sample
  from the minute's start to 0.5 s past its end (a minute with no sample at all there is not
  eligible). ``null`` if a customer had no eligible minute.
- ``per_minute``: ``{customer: {minute: accepted}}``.

The last line of output is one JSON object with those keys, ``baseline`` (the same keys for the
baseline run), ``elapsed_s``, ``settings`` and the load average seen.

Fault scenarios
---------------
``--scenario slow|clock-behind|storm|shared`` runs ours only (no baseline) with the provider
misbehaving as bench/faults.py describes, and adds its keys (``refused``, ``db_disagrees``,
``unknown``, ``unanswered``, ``accepted_over_cap_minutes``; ``shared``: ``share_min``,
``share_max``, ``account_utilization_min``). In a scenario run each customer's per-minute counts
come from the sandbox's list of sends (by recipient domain), so customers sharing one key are
counted apart, and ``over_cap_minutes`` counts each account (key) once. ``--backlog-factor``
shortens a run (recipients = factor x per-minute limit; below 4.5 a run may see fewer than three
full minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from celery import Celery

from bench import burst, faults
from bench.support import delete_customers, ensure_database

BASE_DIR = Path(__file__).resolve().parent.parent

# --- settings ---------------------------------------------------------------------------------
# (label, cap per minute, batch_size)
CUSTOMERS: list[tuple[str, int, int]] = [
    ("cap600", 600, 100),
    ("cap1200", 1_200, 200),
    ("cap6000", 6_000, 500),
]
MAX_WORKERS = 5
CONCURRENCY = 16
GUARD_MS = 250
BACKLOG_FACTOR = 4.5  # recipients per customer = factor x cap
TIME_LIMIT_S = 420.0
LOCAL_WORKER_TIMEOUT_S = 120
CELERY_CONCURRENCY = 8
BASELINE_WORKERS = 2
BASELINE_CONCURRENCY = {"prefork": 4, "threads": 8}
SAMPLE_EVERY_S = 0.5
DB_NAME = "emailops_bench_e2e"
DEFAULT_DATABASE_URL = f"postgres://postgres@127.0.0.1:5432/{DB_NAME}"
REDIS_DB = 5
DEFAULT_REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
SLUG_PREFIX = "bench-e2e-"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
WINDOW_MS = 60_000


# --- the baseline: one Celery task per email with rate_limit ---------------------------------
# A Celery app of its own (never the current app: emailops' shared tasks must keep publishing
# through emailops' app in this process). Its workers are started as
# ``celery -A bench.e2e:baseline_app worker``; the Django fixup (DJANGO_SETTINGS_MODULE is in
# their environment) sets Django up there and manages DB connections around tasks.

baseline_app = Celery("bench_e2e_baseline", set_as_current=False)
baseline_app.conf.update(
    broker_url=os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL,
    result_backend=None,
    task_ignore_result=True,
    # As careful as the project's own Celery settings: one message prefetched per thread.
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    timezone="UTC",
)


def baseline_queue(cap: int) -> str:
    return f"e2e_baseline_{cap}"


_baseline_lock = threading.Lock()
_baseline_providers: dict[int, object] = {}
_baseline_compiled: dict[int, object] = {}


def _baseline_send(recipient_id: int) -> str:
    """Render and send one recipient's email through the shared provider code; record it."""
    from django.db.models import F
    from django.utils import timezone

    from sending.models import Recipient
    from sending.providers import SendError, open_provider
    from sending.rendering import compile_message

    recipient = (
        Recipient.objects.select_related("message__customer__provider_account")
        .filter(pk=recipient_id)
        .first()
    )
    if recipient is None or recipient.status != Recipient.Status.QUEUED:
        return "skipped"
    message = recipient.message
    customer = message.customer
    account = customer.provider_account
    with _baseline_lock:
        compiled = _baseline_compiled.get(message.pk)
        if compiled is None:
            compiled = _baseline_compiled[message.pk] = compile_message(
                subject=message.subject, text_body=message.text_body, html_body=message.html_body
            )
        provider = _baseline_providers.get(account.pk)
        if provider is None:
            # Thread-safe: one backend (requests session) per sending thread, kept open.
            provider = _baseline_providers[account.pk] = open_provider(
                {
                    "kind": account.kind,
                    "settings": account.settings,
                    "credentials": account.credentials,
                }
            )
    subject, text, html = compiled.render(recipient.merge_data or {})
    fields = {"attempts": F("attempts") + 1}
    try:
        provider_id = provider.send(
            recipient_id=recipient.pk,
            to=recipient.email,
            subject=subject,
            text=text,
            html=html,
            from_email=message.from_email or customer.default_from_email,
            reply_to=message.reply_to or customer.default_reply_to,
        )
    except SendError as exc:  # Throttled (429) included
        fields.update(status=Recipient.Status.FAILED, last_error=exc.message[:2000])
        outcome = "failed"
    else:
        fields.update(
            status=Recipient.Status.SENT,
            provider_message_id=str(provider_id)[:255],
            sent_at=timezone.now(),
        )
        outcome = "sent"
    Recipient.objects.filter(pk=recipient.pk).update(**fields)
    return outcome


def _baseline_task(cap: int):
    @baseline_app.task(
        name=f"bench.e2e.baseline_send_{cap}",
        rate_limit=f"{cap // BASELINE_WORKERS}/m",
        ignore_result=True,
    )
    def send(recipient_id: int) -> str:
        return _baseline_send(recipient_id)

    return send


BASELINE_TASKS = {cap: _baseline_task(cap) for _, cap, _ in CUSTOMERS}


# --- environment, database, redis -------------------------------------------------------------


def _configure_environment() -> dict:
    url = os.environ.setdefault("DATABASE_URL", DEFAULT_DATABASE_URL)
    if not url.startswith(("postgres://", "postgresql://", "pgsql://")):
        sys.exit(f"bench.e2e needs PostgreSQL: DATABASE_URL is {url!r}")
    from cryptography.fernet import Fernet

    os.environ.setdefault("REDIS_URL", DEFAULT_REDIS_URL)
    os.environ.setdefault("SECRET_KEY", "bench-e2e-" + secrets.token_urlsafe(48))
    os.environ.setdefault("WORKER_TOKEN_KEY", "bench-e2e-tokens-" + secrets.token_urlsafe(48))
    os.environ.setdefault("FIELD_ENCRYPTION_KEY", Fernet.generate_key().decode())
    os.environ.setdefault("UNSUBSCRIBE_KEY", secrets.token_urlsafe(48))
    os.environ.setdefault("ANYMAIL_WEBHOOK_SECRET", "bench:" + secrets.token_urlsafe(24))
    os.environ.update(
        {
            "DEBUG": "false",
            "ALLOWED_HOSTS": "127.0.0.1",
            "SECURE_SSL_REDIRECT": "false",
            "SEND_WINDOW_MS": str(WINDOW_MS),
            "WORKER_RUNTIME": "local",
            "LOCAL_WORKER_MODE": "process",
            "LOCAL_WORKER_TIMEOUT_S": str(LOCAL_WORKER_TIMEOUT_S),
            "DJANGO_SETTINGS_MODULE": "emailops.settings",
            "PYTHONUNBUFFERED": "1",
        }
    )
    baseline_app.conf.broker_url = os.environ["REDIS_URL"]
    return {"database_url": url, "redis_url": os.environ["REDIS_URL"]}


def _flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    try:
        client.flushdb()
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def minute_key(ms: int) -> str:
    """The sandbox's calendar-minute key (UTC)."""
    return datetime.fromtimestamp(ms // WINDOW_MS * 60, tz=UTC).strftime("%Y-%m-%dT%H:%M")


def _minute_start_ms(key: str) -> int:
    return int(datetime.strptime(key, "%Y-%m-%dT%H:%M").replace(tzinfo=UTC).timestamp() * 1000)


# --- subprocesses -----------------------------------------------------------------------------


class Proc:
    """A subprocess in a session (process group) of its own, logging to a temporary file."""

    def __init__(self, name: str, command: list[str], *, env: dict | None = None):
        self.name = name
        self.command = command
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix=f"bench-e2e-{name}-", suffix=".log", delete=False
        )
        self.process = subprocess.Popen(
            command,
            cwd=BASE_DIR,
            env=env or dict(os.environ),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = self.process.pid  # a new session: its own process group
        self.final_log = ""

    def text(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self.log.flush()
        try:
            return Path(self.log.name).read_text(errors="replace")
        except OSError:
            return self.final_log

    def tail(self, chars: int = 3000) -> str:
        return self.text()[-chars:]

    def wait_for_text(self, needle: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.tail()}"
                )
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: no {needle!r} within {timeout_s} s:\n{self.tail()}")

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the whole group (children included: local worker processes), then SIGKILL."""
        if self.log.closed and not self._group_alive():
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=0.2)
            if self.process.poll() is not None and not self._group_alive():
                break
        if self._group_alive():
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        self.final_log = self.text()
        if not self.log.closed:
            self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


def _wait_http(url: str, proc: Proc, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - http only
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not answer {url} within {timeout_s} s:\n{proc.tail()}")


def _sandbox_report(port: int) -> dict:
    url = f"http://127.0.0.1:{port}/_sandbox/report"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


# --- data -------------------------------------------------------------------------------------


@dataclass
class Customer:
    label: str
    cap: int
    batch_size: int
    api_key: str
    customer_id: int = 0
    message_id: int = 0
    recipients: int = 0


def _create_run(
    run_id: str,
    phase: str,
    sandbox_port: int,
    max_workers: list[int],
    *,
    specs: list[tuple[str, int, int]] | None = None,
    shared_cap: int | None = None,
    backlog_factor: float = BACKLOG_FACTOR,
) -> list[Customer]:
    """Customers with their own sandbox account and key (or, with ``shared_cap``, all on one
    account with that cap), SendLimit, and a draft message."""
    from django.db import connection

    from customers.models import Customer as CustomerModel
    from customers.models import ProviderAccount, SendLimit
    from sending.models import Message

    made = []
    shared = None
    for (label, cap, batch_size), workers in zip(specs or CUSTOMERS, max_workers, strict=True):
        slug = f"{SLUG_PREFIX}{run_id}-{phase}-{label}"
        if shared is not None:
            account = shared
        else:
            account = ProviderAccount.objects.create(
                name=slug,
                kind=ProviderAccount.Kind.SANDBOX,
                settings={"api_url": f"http://127.0.0.1:{sandbox_port}/"},
                credentials={"api_key": f"{slug}-key"},
                per_minute_cap=shared_cap or cap,
            )
            if shared_cap is not None:
                shared = account
        spec = Customer(label, cap, batch_size, api_key=account.credentials["api_key"])
        customer = CustomerModel.objects.create(
            name=slug, slug=slug, default_from_email=f"news@{label}.example",
            provider_account=account,
        )  # fmt: skip
        SendLimit.objects.create(
            customer=customer,
            per_minute=cap,
            max_workers=workers,
            batch_size=batch_size,
            concurrency=CONCURRENCY,
            guard_ms=GUARD_MS,
        )
        message = Message.objects.create(
            customer=customer,
            subject=f"E2E {phase} {{{{ first_name }}}}",
            text_body="Hello {{ first_name }}, this is the end-to-end benchmark.",
            html_body="<p>Hello {{ first_name }}, this is the end-to-end benchmark.</p>",
        )
        n = int(cap * backlog_factor)
        with connection.cursor() as cursor:
            cursor.execute(
                """
                INSERT INTO sending_recipient
                    (message_id, email, merge_data, status, attempts, provider_message_id,
                     last_error, sent_at)
                SELECT %s, 'r' || g || '@m' || %s || '.example',
                       jsonb_build_object('first_name', 'Student ' || g), 'queued', 0, '', '',
                       NULL
                FROM generate_series(1, %s) AS g
                """,
                [message.pk, message.pk, n],
            )
        spec.customer_id, spec.message_id, spec.recipients = customer.pk, message.pk, n
        made.append(spec)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sending_recipient")
    return made


def _cleanup(prefix: str = SLUG_PREFIX) -> None:
    """Delete the bench's rows: one run's (its slug prefix), or every bench run's (stale)."""
    delete_customers(slug_prefix=prefix, account_prefix=SLUG_PREFIX)


def _final_statuses(customers: list[Customer]) -> dict[int, str]:
    """Each recipient's final status, by id (one statement)."""
    from sending.models import Recipient

    rows = Recipient.objects.filter(message_id__in=[c.message_id for c in customers])
    return dict(rows.values_list("id", "status"))


def _status_counts(message_ids: list[int]) -> dict[int, dict[str, int]]:
    from django.db.models import Count

    from sending.models import Recipient

    counts: dict[int, dict[str, int]] = {m: {} for m in message_ids}
    rows = (
        Recipient.objects.filter(message_id__in=message_ids)
        .values_list("message_id", "status")
        .annotate(n=Count("id"))
    )
    for message_id, status, n in rows:
        counts[message_id][status] = n
    return counts


# --- backlog sampling -------------------------------------------------------------------------


@dataclass
class Sampler:
    """Samples each message's queued count every SAMPLE_EVERY_S in a thread of its own."""

    message_ids: list[int]
    samples: list[tuple[int, dict[int, int]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="backlog-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        from django.db import connection

        try:
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    with connection.cursor() as cursor:
                        cursor.execute(
                            "SELECT message_id, count(*) FROM sending_recipient "
                            "WHERE message_id = ANY(%s) AND status = 'queued' GROUP BY message_id",
                            [self.message_ids],
                        )
                        found = dict(cursor.fetchall())
                    now_ms = time.time_ns() // 1_000_000
                    self.samples.append((now_ms, {m: found.get(m, 0) for m in self.message_ids}))
                except Exception as exc:  # keep sampling; report at the end
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(max(0.0, SAMPLE_EVERY_S - (time.monotonic() - began)))
        finally:
            connection.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def latest(self) -> dict[int, int]:
        return self.samples[-1][1] if self.samples else {}

    def backlog_throughout(self, message_id: int, minute: str) -> bool | None:
        """True if every sample from the minute's start to SAMPLE_EVERY_S past its end saw queued
        recipients; None if no sample fell there."""
        start = _minute_start_ms(minute)
        end = start + WINDOW_MS + int(SAMPLE_EVERY_S * 1000)
        seen = [s[message_id] for t, s in self.samples if start <= t <= end]
        if not seen:
            return None
        return min(seen) > 0


# --- measuring --------------------------------------------------------------------------------


def measure(
    customers: list[Customer],
    report: dict,
    sampler: Sampler,
    final_counts: dict,
    by_label: dict[str, dict[str, int]] | None = None,
) -> dict:
    """``by_label``: accepted per customer and minute counted apart from the sandbox's sends
    (customers may share a key); then ``over_cap_minutes`` counts each key once."""
    accepted = report.get("accepted_per_minute", {})
    throttled = report.get("throttled", {})
    over = report.get("over_cap_minutes", {})
    result: dict = {
        "over_cap_minutes": 0,
        "duplicates": 0,
        "lost": 0,
        "utilization_min": None,
        "per_minute": {},
    }
    details: dict = {}
    utils = []
    keys_seen: set[str] = set()
    for c in customers:
        if by_label is not None:
            minutes = dict(sorted(by_label.get(c.label, {}).items()))
        else:
            minutes = dict(sorted(accepted.get(c.api_key, {}).items()))
        result["per_minute"][c.label] = minutes
        if by_label is None or c.api_key not in keys_seen:
            result["over_cap_minutes"] += len(over.get(c.api_key, {}))
            result["duplicates"] += int(report.get("duplicates", {}).get(c.api_key, 0))
        keys_seen.add(c.api_key)
        counts = final_counts.get(c.message_id, {})
        result["lost"] += counts.get("queued", 0) + counts.get("leased", 0)
        keys = list(minutes)
        rows = []
        eligible = []
        for i, minute in enumerate(keys):
            backlog = sampler.backlog_throughout(c.message_id, minute)
            why = ""
            if i == 0:
                why = "first"
            elif i == len(keys) - 1:
                why = "last"
            elif backlog is None:
                why = "no samples"
            elif not backlog:
                why = "backlog ran out"
            ratio = minutes[minute] / c.cap
            if not why:
                eligible.append(ratio)
            rows.append(
                {
                    "minute": minute,
                    "accepted": minutes[minute],
                    "throttled": throttled.get(c.api_key, {}).get(minute, 0),
                    "attempted_over_cap": over.get(c.api_key, {}).get(minute),
                    "ratio": ratio,
                    "excluded": why,
                }
            )
        util = min(eligible) if eligible else None
        if util is not None:
            utils.append(util)
        else:
            utils.append(None)
        details[c.label] = {
            "cap": c.cap,
            "rows": rows,
            "utilization": util,
            "eligible_minutes": len(eligible),
            "accepted_over_cap": sum(1 for n in minutes.values() if n > c.cap),
            "statuses": counts,
            "total": c.recipients,
        }
    known = [u for u in utils if u is not None]
    result["utilization_min"] = round(min(known), 4) if known and len(known) == len(utils) else None
    return {"result": result, "details": details}


def print_table(title: str, measured: dict) -> None:
    print(f"\n== {title}: accepted at the sandbox per customer per calendar minute (UTC) ==")
    details = measured["details"]
    for label, d in details.items():
        print(
            f"  {label} (cap {d['cap']}/min, {d['total']} recipients; final statuses "
            f"{dict(sorted(d['statuses'].items()))}; utilization over {d['eligible_minutes']} "
            f"eligible minutes: {_fmt(d['utilization'])}; accepted>cap minutes: "
            f"{d['accepted_over_cap']})"
        )
        head = f"{'minute':<17} {'accepted':>8} {'of cap':>8} {'429s':>6} {'tried>cap':>9}"
        print(f"    {head}  note")
        for row in d["rows"]:
            tried = "" if row["attempted_over_cap"] is None else str(row["attempted_over_cap"])
            note = f"excluded: {row['excluded']}" if row["excluded"] else "eligible"
            print(
                f"    {row['minute']:<17} {row['accepted']:>8} {row['ratio']:>8.2%} "
                f"{row['throttled']:>6} {tried:>9}  {note}"
            )
    r = measured["result"]
    print(
        f"  => over_cap_minutes={r['over_cap_minutes']} duplicates={r['duplicates']} "
        f"lost={r['lost']} utilization_min={_fmt(r['utilization_min'])}"
    )


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _ledger_rows(customers: list[Customer]) -> dict:
    """Our pacing ledger per customer minute, for diagnosis next to the sandbox's counts."""
    from sending.models import CustomerMinute

    out: dict = {}
    for c in customers:
        rows = CustomerMinute.objects.filter(customer_id=c.customer_id).order_by("minute_start")
        out[c.label] = [
            {
                "minute": r.minute_start.strftime("%Y-%m-%dT%H:%M"),
                "granted": r.granted,
                "refunded": r.refunded,
                "carried_in": r.carried_in,
                "sent": r.sent,
                "failed": r.failed,
                "throttled": r.throttled,
            }
            for r in rows
        ]
    return out


def _worker_stats(customers: list[Customer]) -> dict:
    from django.db.models import Count

    from sending.models import Worker

    out = {}
    for c in customers:
        states = dict(
            Worker.objects.filter(customer_id=c.customer_id)
            .values_list("state")
            .annotate(n=Count("id"))
            .values_list("state", "n")
        )
        reasons = dict(
            Worker.objects.filter(customer_id=c.customer_id)
            .values_list("stop_reason")
            .annotate(n=Count("id"))
            .values_list("stop_reason", "n")
        )
        out[c.label] = {"states": states, "stop_reasons": reasons}
    return out


# --- the two runs -----------------------------------------------------------------------------


def run_ours(
    customers: list[Customer], api_port: int, time_limit_s: float, procs: list, on_start=None
) -> dict:
    from sending import services
    from sending.models import Message

    api_url = f"http://127.0.0.1:{api_port}/api/worker/v1/"
    env = {**os.environ, "WORKER_API_URL": api_url}
    web = Proc(
        "uvicorn",
        [sys.executable, "-m", "uvicorn", "emailops.asgi:application", "--host", "127.0.0.1",
         "--port", str(api_port), "--workers", "2", "--no-access-log", "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    procs.append(web)
    worker = Proc(
        "celery-worker",
        [sys.executable, "-m", "celery", "-A", "emailops", "worker", "--pool", "threads",
         "--concurrency", str(CELERY_CONCURRENCY), "-Q", "celery", "-n", "e2e-emailops@%h",
         "--without-mingle", "--without-gossip", "--loglevel", "INFO"],
        env=env,
    )  # fmt: skip
    procs.append(worker)
    beat_dir = tempfile.mkdtemp(prefix="bench-e2e-beat-")
    beat = Proc(
        "celery-beat",
        [sys.executable, "-m", "celery", "-A", "emailops", "beat", "--loglevel", "WARNING",
         "-s", os.path.join(beat_dir, "schedule")],
        env=env,
    )  # fmt: skip
    procs.append(beat)
    _wait_http(f"http://127.0.0.1:{api_port}/api/worker/v1/openapi.yaml", web)
    worker.wait_for_text(" ready.")
    print(f"[ours] web, Celery worker and beat up; load {_load()}", flush=True)

    sampler = Sampler([c.message_id for c in customers]).start()
    time.sleep(1.0)
    t0 = time.monotonic()
    started_at = time.time()
    if on_start is not None:
        on_start()
    for c in customers:
        services.message_start(message_id=c.message_id)
    print(
        f"[ours] started 3 messages at {datetime.now(UTC):%H:%M:%S.%f} UTC "
        f"(within {time.monotonic() - t0:.3f} s)",
        flush=True,
    )
    ids = [c.message_id for c in customers]
    last_print = 0.0
    completed = False
    while True:
        elapsed = time.monotonic() - t0
        statuses = dict(Message.objects.filter(pk__in=ids).values_list("pk", "status"))
        if all(s == Message.Status.COMPLETED for s in statuses.values()):
            completed = True
            break
        if elapsed >= time_limit_s:
            break
        for p in (web, worker, beat):
            if p.process.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.process.returncode}:\n{p.tail()}")
        if elapsed - last_print >= 15:
            last_print = elapsed
            queued = sampler.latest()
            print(
                f"[ours] t={elapsed:5.0f}s queued "
                + ", ".join(f"{c.label}={queued.get(c.message_id, '?')}" for c in customers)
                + f"; load {_load()}",
                flush=True,
            )
        time.sleep(0.5)
    elapsed_s = time.monotonic() - t0
    time.sleep(SAMPLE_EVERY_S * 2)  # one more backlog sample past the end
    sampler.stop()
    final_counts = _status_counts(ids)  # before anything is stopped
    print(
        f"[ours] {'all messages completed' if completed else 'TIME LIMIT reached'} after "
        f"{elapsed_s:.1f} s; load {_load()}",
        flush=True,
    )
    ledger = _ledger_rows(customers)
    workers = _worker_stats(customers)
    worker_log = worker.text()
    for p in (beat, worker, web):
        p.stop()
    shutil.rmtree(beat_dir, ignore_errors=True)
    return {
        "elapsed_s": elapsed_s,
        "completed": completed,
        "started_at": started_at,
        "sampler": sampler,
        "final_counts": final_counts,
        "ledger": ledger,
        "workers": workers,
        "errors": _log_problems(worker_log) + _log_problems(web.final_log),
    }


def _log_problems(text: str) -> list[str]:
    """Error lines, and each traceback's last line (the exception), which says what it was."""
    keep = ("ERROR", "Traceback", "CRITICAL")
    found, in_traceback = [], False
    for line in text.splitlines():
        if any(k in line for k in keep):
            found.append(line[:300])
            in_traceback = "Traceback" in line
        elif in_traceback and line and not line[0].isspace():
            found.append(line[:300])
            in_traceback = False
    return found[:30]


def run_baseline(
    customers: list[Customer], duration_s: float, procs: list, pool: str = "prefork"
) -> dict:
    from django.db.models import Q

    from sending.models import Recipient

    ids = {c.message_id: c for c in customers}
    # Enqueue first (one task per recipient, interleaved across customers in proportion to their
    # size, as one loop over all of them would), then start the workers: the run's clock starts
    # when they are launched, not while this process is still publishing.
    t_enqueue = time.monotonic()
    pending = {
        c.message_id: list(
            Recipient.objects.filter(message_id=c.message_id)
            .order_by("id")
            .values_list("id", flat=True)
        )
        for c in customers
    }
    total = sum(len(v) for v in pending.values())
    done_so_far = {m: 0 for m in pending}
    with baseline_app.producer_or_acquire() as producer:
        for _ in range(total):
            # The customer furthest behind its share goes next.
            m = min(
                (m for m in pending if done_so_far[m] < len(pending[m])),
                key=lambda m: done_so_far[m] / len(pending[m]),
            )
            c = ids[m]
            BASELINE_TASKS[c.cap].apply_async(
                (pending[m][done_so_far[m]],), queue=baseline_queue(c.cap), producer=producer
            )
            done_so_far[m] += 1
    print(
        f"[baseline] enqueued {total} tasks in {time.monotonic() - t_enqueue:.1f} s "
        f"(before the workers start); load {_load()}",
        flush=True,
    )
    sampler = Sampler(list(ids)).start()
    time.sleep(1.0)
    queues = ",".join(baseline_queue(c.cap) for c in customers)
    workers = []
    t0 = time.monotonic()
    for i in range(BASELINE_WORKERS):
        p = Proc(
            f"baseline-{i + 1}",
            [sys.executable, "-m", "celery", "-A", "bench.e2e:baseline_app", "worker",
             "--pool", pool, "--concurrency", str(BASELINE_CONCURRENCY[pool]), "-Q", queues,
             "-n", f"e2e-baseline-{i + 1}@%h", "--without-mingle", "--without-gossip",
             "--loglevel", "INFO"],
        )  # fmt: skip
        procs.append(p)
        workers.append(p)
    for p in workers:
        p.wait_for_text(" ready.")
    print(
        f"[baseline] {BASELINE_WORKERS} Celery workers up {time.monotonic() - t0:.1f} s after "
        f"launch; load {_load()}",
        flush=True,
    )
    last_print = 0.0
    done = False
    while True:
        elapsed = time.monotonic() - t0
        open_ = Recipient.objects.filter(
            Q(status="queued") | Q(status="leased"), message_id__in=list(ids)
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
                f"[baseline] t={elapsed:5.0f}s queued "
                + ", ".join(f"{c.label}={queued.get(c.message_id, '?')}" for c in customers)
                + f"; load {_load()}",
                flush=True,
            )
        time.sleep(0.5)
    elapsed_s = time.monotonic() - t0
    time.sleep(SAMPLE_EVERY_S * 2)
    sampler.stop()
    final_counts = _status_counts(list(ids))
    print(
        f"[baseline] {'all recipients done' if done else 'duration reached'} after "
        f"{elapsed_s:.1f} s; load {_load()}",
        flush=True,
    )
    logs = ""
    for p in workers:
        logs += p.text()
        p.stop()
    return {
        "elapsed_s": elapsed_s,
        "completed": done,
        "sampler": sampler,
        "final_counts": final_counts,
        "errors": _log_problems(logs),
    }


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--time-limit-s", type=float, default=TIME_LIMIT_S)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--baseline-pool", choices=sorted(BASELINE_CONCURRENCY), default="prefork")
    parser.add_argument(
        "--burst-baseline",
        action="store_true",
        help="also run the burst baseline (bench/burst.py); the sandbox clock runs 300 ms behind",
    )
    parser.add_argument(
        "--max-workers",
        default=str(MAX_WORKERS),
        help="SendLimit.max_workers: one number, or one per customer (e.g. 1,1,2)",
    )
    parser.add_argument(
        "--scenario",
        choices=faults.SCENARIOS,
        default=None,
        help="a fault scenario (bench/faults.py); runs ours only",
    )
    parser.add_argument(
        "--backlog-factor",
        type=float,
        default=BACKLOG_FACTOR,
        help="recipients per customer = factor x its per-minute limit",
    )
    parser.add_argument(
        "--cap-scale",
        type=float,
        default=1.0,
        help="scale the three customers' caps (and batch sizes) by this factor, e.g. 0.1",
    )
    args = parser.parse_args(argv)
    if args.cap_scale != 1.0 and not args.scenario:
        parser.error("--cap-scale needs --scenario (the baseline's Celery tasks are per cap)")
    specs = CUSTOMERS
    if args.cap_scale != 1.0:
        scaled = [(max(1, round(cap * args.cap_scale)), batch) for _, cap, batch in CUSTOMERS]
        specs = [(f"cap{cap}", cap, max(1, min(batch, cap // 6))) for cap, batch in scaled]
    fault = faults.scenario(args.scenario, specs) if args.scenario else None
    max_workers = [int(n) for n in args.max_workers.split(",")]
    if len(max_workers) == 1:
        max_workers *= len(CUSTOMERS)
    if len(max_workers) != len(CUSTOMERS) or not all(1 <= n <= 100 for n in max_workers):
        parser.error(f"--max-workers: one number or {len(CUSTOMERS)}, each 1-100")

    bench_t0 = time.monotonic()
    conf = _configure_environment()
    import django

    django.setup()
    from django.core.management import call_command

    # This process only starts messages and reads results: keep its own INFO lines out.
    logging.getLogger("sending").setLevel(logging.WARNING)

    ensure_database()
    call_command("migrate", verbosity=0, interactive=False)
    _cleanup()  # rows left by an interrupted earlier run
    _flush_redis()
    loads = {"start": _load()}
    print(f"bench.e2e: load average at start {loads['start']} (2 cores)", flush=True)

    run_id = secrets.token_hex(3)
    sandbox_port = _free_port()
    api_port = _free_port()
    procs: list[Proc] = []
    ours: list[Customer] = []
    base: list[Customer] = []
    try:
        ours = _create_run(
            run_id,
            "ours",
            sandbox_port,
            max_workers,
            specs=fault.customers if fault else specs,
            shared_cap=fault.shared_cap if fault else None,
            backlog_factor=args.backlog_factor,
        )
        if fault is None:
            base = _create_run(
                run_id,
                "base",
                sandbox_port,
                max_workers,
                specs=specs,
                backlog_factor=args.backlog_factor,
            )
        bursts = (
            _create_run(run_id, "burst", sandbox_port, max_workers, specs=specs)
            if args.burst_baseline and fault is None
            else []
        )
        caps = {c.api_key: (fault and fault.shared_cap) or c.cap for c in ours + base + bursts}
        sandbox = Proc(
            "sandbox",
            [sys.executable, "-m", "sending.sandbox", "--port", str(sandbox_port)]
            + [arg for key, cap in caps.items() for arg in ("--cap", f"{key}={cap}")]
            + (fault.sandbox_args if fault else [])
            + (burst.SANDBOX_ARGS if bursts else []),
        )
        procs.append(sandbox)
        _wait_http(f"http://127.0.0.1:{sandbox_port}/_sandbox/report", sandbox)
        if fault is not None:
            from django.conf import settings

            fault.prepare(sandbox_port, settings.SEND_TIMEOUT_MS)
            print(f"bench.e2e: scenario {fault.name}", flush=True)
        print(
            "bench.e2e: customers "
            + ", ".join(f"{c.label} ({c.recipients} recipients)" for c in ours)
            + f"; sandbox on :{sandbox_port}, API on :{api_port}",
            flush=True,
        )

        on_start = (lambda: fault.start(sandbox_port, WINDOW_MS)) if fault else None
        ours_run = run_ours(ours, api_port, args.time_limit_s, procs, on_start=on_start)
        loads["after_ours"] = _load()
        report = report_ours = _sandbox_report(sandbox_port)
        fault_out: dict = {}
        by_label = None
        if fault is not None:
            sends = faults.sandbox_sends(sandbox_port)
            by_label = faults.per_customer_minutes(ours, sends, minute_key)
            fault_out = faults.fault_keys(
                scenario=fault,
                customers=ours,
                report=report,
                sends=sends,
                statuses=_final_statuses(ours),
            )
        ours_measured = measure(
            ours, report, ours_run["sampler"], ours_run["final_counts"], by_label=by_label
        )
        if fault is not None:
            fault_out.update(faults.shared_keys(scenario=fault, details=ours_measured["details"]))

        base_run = None
        base_measured = None
        if not args.skip_baseline and fault is None:
            duration = min(ours_run["elapsed_s"], args.time_limit_s)
            base_run = run_baseline(base, duration, procs, pool=args.baseline_pool)
            loads["after_baseline"] = _load()
            report = _sandbox_report(sandbox_port)
            base_measured = measure(base, report, base_run["sampler"], base_run["final_counts"])

        burst_run = None
        if bursts:
            duration = min(ours_run["elapsed_s"], args.time_limit_s)
            burst_run = burst.run(bursts, duration, procs, sandbox_port)

        print_table(
            f"OURS (conductor + process workers; {ours_run['elapsed_s']:.1f} s, "
            f"{'completed' if ours_run['completed'] else 'TIME LIMIT'})",
            ours_measured,
        )
        print("  our pacing ledger (CustomerMinute: granted, refunded, carried_in, sent, "
              "failed, throttled):")  # fmt: skip
        for label, rows in ours_run["ledger"].items():
            print(f"    {label}:")
            for r in rows:
                print(
                    f"      {r['minute']}  granted {r['granted']:>6}  refunded {r['refunded']:>5}"
                    f"  carried_in {r['carried_in']:>4}  sent {r['sent']:>6}  failed "
                    f"{r['failed']:>3}  throttled {r['throttled']:>3}"
                )
        print("  workers: " + json.dumps(ours_run["workers"]))
        for line in ours_run["errors"]:
            print(f"  log: {line}")
        if base_measured is not None:
            print_table(
                f"BASELINE (Celery task per email, rate_limit=cap/2 per worker, 2 workers; "
                f"{base_run['elapsed_s']:.1f} s)",
                base_measured,
            )
            for line in base_run["errors"]:
                print(f"  log: {line}")
        for name, run in (("ours", ours_run), ("baseline", base_run)):
            if run is not None and run["sampler"].errors:
                print(f"  {name} sampler errors: {run['sampler'].errors[:3]}")
        out = dict(ours_measured["result"])
        out.update(fault_out)
        out["scenario"] = fault.name if fault else None
        if burst_run is not None:
            out["burst"] = burst.print_beside(out, burst.refusals(ours, report_ours), burst_run)
        loads["end"] = _load()
        out["baseline"] = base_measured["result"] if base_measured else None
        out["elapsed_s"] = round(ours_run["elapsed_s"], 1)
        out["baseline_elapsed_s"] = round(base_run["elapsed_s"], 1) if base_run else None
        out["bench_elapsed_s"] = round(time.monotonic() - bench_t0, 1)
        out["utilization_by_customer"] = {
            label: d["utilization"] for label, d in ours_measured["details"].items()
        }
        if base_measured:
            out["baseline"]["utilization_by_customer"] = {
                label: d["utilization"] for label, d in base_measured["details"].items()
            }
        out["settings"] = {
            "customers": [
                {
                    "label": c.label,
                    "per_minute": c.cap,
                    "per_minute_cap": (fault and fault.shared_cap) or c.cap,
                    "batch_size": c.batch_size,
                    "recipients": c.recipients,
                }
                for c in ours
            ],
            "max_workers": dict(zip([c.label for c in ours], max_workers, strict=True)),
            "concurrency": CONCURRENCY,
            "guard_ms": GUARD_MS,
            "backlog_factor": args.backlog_factor,
            "cap_scale": args.cap_scale,
            "time_limit_s": args.time_limit_s,
            "send_window_ms": WINDOW_MS,
            "worker_runtime": "local/process",
            "local_worker_timeout_s": LOCAL_WORKER_TIMEOUT_S,
            "celery": f"threads x {CELERY_CONCURRENCY} + beat (DatabaseScheduler)",
            "web": "uvicorn --workers 2",
            "baseline": f"{BASELINE_WORKERS} Celery workers, {args.baseline_pool} x "
            f"{BASELINE_CONCURRENCY[args.baseline_pool]}, "
            f"rate_limit cap/{BASELINE_WORKERS} per minute per worker, one task per customer",
            "database": conf["database_url"].rsplit("@", 1)[-1],
            "redis": conf["redis_url"],
        }
        out["load_avg"] = loads
        print(json.dumps(out), flush=True)
        return 0
    finally:
        for p in reversed(procs):
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {p.name}: {exc}", file=sys.stderr)
        with contextlib.suppress(Exception):
            _cleanup(f"{SLUG_PREFIX}{run_id}-")
        with contextlib.suppress(Exception):
            _flush_redis()


if __name__ == "__main__":
    sys.exit(main())
