"""A fleet of customers sending at once through the production topology, on this machine.

Shared by the benchmarks that need many customers live (``bench.live``, and the scale work's
``bench.fleet``):

- the web process: ``uvicorn emailops.asgi:application`` (worker API, admin, websockets);
- a Celery worker (``--pool threads``) and Celery beat, on Redis;
- PostgreSQL (``DATABASE_URL``);
- workers invoked through the production runtime (``WORKER_RUNTIME=lambda``: boto3's signed
  ``Invoke``) at ``bench.lambda_local``, which runs each in a thread of its own process — the real
  worker handler, no simulation, and no process per worker (``workers_in="celery"``: the LOCAL
  runtime's threads inside the Celery processes instead, as before). A hundred customers means a
  hundred worker threads at least; as processes they would need about 50 MB each and a Python
  start (~0.5 s of CPU) per invocation, which two cores cannot give next to the server, the
  database and the load generator. In their own process they no longer share the conductor's
  GIL, as they would not on AWS; they still share the machine's two cores;
- the sandbox provider (``python -m sending.sandbox``) as its own process, one API key per
  customer, each capped at the customer's limit, answering after a set latency.

Every process is started in a session of its own and its process group is terminated at the end
(see ``bench.e2e.Proc``); the fleet's rows are deleted at the end.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bench.e2e import Proc, _free_port, _load, _wait_http
from bench.support import delete_customers, ensure_database


@dataclass(frozen=True)
class FleetSpec:
    customers: int
    per_minute: int = 60
    recipients: int = 400
    batch_size: int = 10
    concurrency: int = 1
    max_workers: int = 1
    guard_ms: int = 250
    latency_ms: float = 400.0  # the sandbox's median answer time
    tick_ms: int = 500  # CONDUCTOR_TICK_MS
    celery_concurrency: int = 8
    # Celery worker processes: one per core, as a deployment would run them (each process's
    # ticks and worker threads share one GIL).
    celery_workers: int = 2
    local_worker_timeout_s: int = 300
    # Where the workers run: "lambda" (the production runtime, boto3 invoking bench.lambda_local,
    # a process of its own) or "celery" (the LOCAL runtime's threads inside the Celery processes,
    # sharing the conductor's GIL).
    workers_in: str = "lambda"
    slug_prefix: str = "bench-fleet-"
    # What the processes load: bench.fleet loads its counters into them (bench.fleet_probe).
    celery_app: str = "emailops"
    asgi_app: str = "emailops.asgi:application"
    extra_env: tuple[tuple[str, str], ...] = ()


@dataclass
class FleetCustomer:
    customer_id: int
    message_id: int
    api_key: str


@dataclass
class Fleet:
    spec: FleetSpec
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    api_port: int = field(default_factory=_free_port)
    sandbox_port: int = field(default_factory=_free_port)
    lambda_port: int = field(default_factory=_free_port)
    customers: list[FleetCustomer] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def prefix(self) -> str:
        return f"{self.spec.slug_prefix}{self.run_id}-"

    # --- set up -------------------------------------------------------------------------------

    def create(self) -> None:
        """Customers, each with its own sandbox account and a draft message."""
        from django.db import connection

        from customers.models import Customer, ProviderAccount, SendLimit
        from sending.models import Message

        spec = self.spec
        for i in range(spec.customers):
            slug = f"{self.prefix}{i:03d}"
            account = ProviderAccount.objects.create(
                name=slug,
                kind=ProviderAccount.Kind.SANDBOX,
                settings={"api_url": f"http://127.0.0.1:{self.sandbox_port}/"},
                credentials={"api_key": f"{slug}-key"},
                per_minute_cap=spec.per_minute,
            )
            customer = Customer.objects.create(
                name=f"Fleet college {i}",
                slug=slug,
                default_from_email=f"news@{slug}.example",
                provider_account=account,
            )
            SendLimit.objects.create(
                customer=customer,
                per_minute=spec.per_minute,
                max_workers=spec.max_workers,
                batch_size=spec.batch_size,
                concurrency=spec.concurrency,
                guard_ms=spec.guard_ms,
            )
            message = Message.objects.create(
                customer=customer,
                subject="Fleet {{ first_name }}",
                text_body="Hello {{ first_name }}.",
            )
            insert_recipients(connection, message.pk, spec.recipients)
            self.customers.append(FleetCustomer(customer.pk, message.pk, f"{slug}-key"))
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE sending_recipient")

    def start(self) -> None:
        """The sandbox, the web process, the Celery worker and beat; returns once they answer."""
        spec = self.spec
        caps = [arg for c in self.customers for arg in ("--cap", f"{c.api_key}={spec.per_minute}")]
        sandbox = self._proc(
            "sandbox",
            [sys.executable, "-m", "sending.sandbox", "--port", str(self.sandbox_port),
             "--latency-median-ms", str(spec.latency_ms), *caps],
        )  # fmt: skip
        env = {
            **os.environ,
            "WORKER_API_URL": f"{self.web_url}/api/worker/v1/",
            "CONDUCTOR_TICK_MS": str(spec.tick_ms),
            **self._runtime_env(),
            **dict(spec.extra_env),
        }
        if spec.workers_in == "lambda":
            lambda_local = self._proc(
                "lambda-local",
                [sys.executable, "-m", "bench.lambda_local", "--port", str(self.lambda_port),
                 "--timeout-s", str(spec.local_worker_timeout_s)],
                env=env,
            )  # fmt: skip
            lambda_local.wait_for_text("listening")
        web = self._proc(
            "uvicorn",
            [sys.executable, "-m", "uvicorn", spec.asgi_app, "--host", "127.0.0.1",
             "--port", str(self.api_port), "--no-access-log", "--log-level", "warning"],
            env=env,
        )  # fmt: skip
        workers = []
        for i in range(spec.celery_workers):
            command = [sys.executable, "-m", "celery", "-A", spec.celery_app, "worker"]
            command += ["--pool", "threads", "--concurrency", str(spec.celery_concurrency)]
            command += ["-Q", "celery", "-n", f"fleet-{self.run_id}-{i}@%h"]
            command += ["--without-mingle", "--without-gossip", "--loglevel", "INFO"]
            workers.append(self._proc(f"celery-worker-{i}", command, env=env))
        beat_dir = tempfile.mkdtemp(prefix="bench-fleet-beat-")
        self._proc(
            "celery-beat",
            [sys.executable, "-m", "celery", "-A", spec.celery_app, "beat", "--loglevel", "WARNING",
             "--scheduler", "celery.beat:PersistentScheduler",
             "-s", os.path.join(beat_dir, "schedule")],
            env=env,
        )  # fmt: skip
        _wait_http(f"http://127.0.0.1:{self.sandbox_port}/_sandbox/report", sandbox)
        _wait_http(f"{self.web_url}/api/worker/v1/openapi.yaml", web)
        for worker in workers:
            worker.wait_for_text(" ready.")

    def _runtime_env(self) -> dict:
        if self.spec.workers_in == "celery":
            return {
                "WORKER_RUNTIME": "local",
                "LOCAL_WORKER_MODE": "thread",
                "LOCAL_WORKER_TIMEOUT_S": str(self.spec.local_worker_timeout_s),
            }
        if self.spec.workers_in != "lambda":
            raise ValueError(f"workers_in is 'lambda' or 'celery', not {self.spec.workers_in!r}")
        return {
            "WORKER_RUNTIME": "lambda",
            "LAMBDA_FUNCTION_NAME": "emailops-worker",
            "AWS_ENDPOINT_URL_LAMBDA": f"http://127.0.0.1:{self.lambda_port}",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
        }

    def _proc(self, name: str, command: list[str], env: dict | None = None) -> Proc:
        proc = Proc(name, command, env=env)
        self.procs.append(proc)
        return proc

    def start_sends(self) -> float:
        """Send now, every message one after the other; returns when the last was started."""
        from sending import services

        for c in self.customers:
            services.message_start(message_id=c.message_id)
        return time.time()

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.process.poll() is not None:
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {proc.name}: {exc}", file=sys.stderr)
        self.procs.clear()

    def delete(self) -> None:
        delete_customers(slug_prefix=self.prefix, account_prefix=self.spec.slug_prefix)

    def cpu_s(self, prefix: str) -> float:
        """CPU seconds (user + system) so far of the fleet's processes named `prefix`…"""
        total = 0.0
        for proc in self.procs:
            if proc.name.startswith(prefix):
                with open(f"/proc/{proc.process.pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


def insert_recipients(connection, message_id: int, n: int, *, sent: int = 0) -> None:
    """n recipients for a message in one statement; the first `sent` of them already sent."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO sending_recipient
                (message_id, email, merge_data, status, attempts, provider_message_id,
                 last_error, sent_at)
            SELECT %s, 'r' || g || '@m' || %s || '.example',
                   jsonb_build_object('first_name', 'Student ' || g),
                   CASE WHEN g <= %s THEN 'sent' ELSE 'queued' END, 0, '', '', NULL
            FROM generate_series(1, %s) AS g
            """,
            [message_id, message_id, sent, n],
        )


def configure_environment(*, database_url: str, redis_url: str) -> dict:
    """Production settings (DEBUG off) for this process and every process the fleet starts."""
    if not database_url.startswith(("postgres://", "postgresql://")):
        sys.exit(f"the fleet needs PostgreSQL: DATABASE_URL is {database_url!r}")
    from cryptography.fernet import Fernet

    os.environ.setdefault("SECRET_KEY", "bench-fleet-" + secrets.token_urlsafe(48))
    os.environ.setdefault("WORKER_TOKEN_KEY", "bench-fleet-tokens-" + secrets.token_urlsafe(48))
    os.environ.setdefault("FIELD_ENCRYPTION_KEY", Fernet.generate_key().decode())
    os.environ.setdefault("UNSUBSCRIBE_KEY", secrets.token_urlsafe(48))
    os.environ.setdefault("ANYMAIL_WEBHOOK_SECRET", "bench:" + secrets.token_urlsafe(24))
    os.environ.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "DEBUG": "false",
            "ALLOWED_HOSTS": "127.0.0.1",
            "SECURE_SSL_REDIRECT": "false",
            "SESSION_COOKIE_SECURE": "false",
            "CSRF_COOKIE_SECURE": "false",
            "DJANGO_SETTINGS_MODULE": "emailops.settings",
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "WARNING",
        }
    )
    import django

    django.setup()
    from django.core.management import call_command

    ensure_database()
    call_command("migrate", verbosity=0, interactive=False)
    return {"database": database_url.rsplit("@", 1)[-1], "redis": redis_url, "load": _load()}


def flush_redis(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()
