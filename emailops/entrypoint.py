"""The image's entry point: one image, a role per container.

    python -m emailops.entrypoint ROLE [ARGS…]

    web          the ASGI app (admin, worker API, websockets, /healthz) under uvicorn on PORT;
                 with ROUTE53_ZONE_ID set, registers the task's address in Route 53 once it
                 listens and deregisters on SIGTERM (emailops/route53.py)
    conductor    the Celery worker that runs the conductor ticks; SIGTERM starts Celery's soft
                 shutdown (CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT), well inside ECS's stopTimeout
    beat         Celery beat (exactly one: the watchdog and scheduled sends)
    migrate      `check --deploy --database default`, then `migrate` (a one-off task, before a
                 rolling deploy)
    worker       the worker handler in this process (`python -m sending.worker ARGS…`), for tests
    manage       `manage.py ARGS…` (one-off commands: createsuperuser, rotate_encryption_keys, …)
    healthcheck  the container health check for the role this container runs

Roles that run one program exec it, so the program gets SIGTERM itself as PID 1 (each installs
its own handler); the web role stays in Python to deregister before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import uvicorn

from emailops.route53 import Registration, RegistrationError

ROLES = ("web", "conductor", "beat", "migrate", "worker", "manage", "healthcheck")
ROLE_FILE = "emailops-role"

log = logging.getLogger("emailops.entrypoint")


def _env_int(env, name: str, default: int) -> int:
    value = env.get(name, "")
    return int(value) if value.strip() else default


def _role_path(env) -> Path:
    return Path(env.get("EMAILOPS_RUN_DIR") or tempfile.gettempdir()) / ROLE_FILE


def command(role: str, args: list[str], env) -> list[str]:
    """The program a role execs (all roles but web, migrate and healthcheck)."""
    python = sys.executable
    level = env.get("LOG_LEVEL", "INFO")
    if role == "conductor":
        return [
            python, "-m", "celery", "-A", "emailops", "worker",
            "--hostname", f"conductor@{socket.gethostname()}",
            "--pool", env.get("CONDUCTOR_POOL", "threads"),
            "--concurrency", str(_env_int(env, "CONDUCTOR_CONCURRENCY", 8)),
            "--loglevel", level, "--without-gossip", "--without-mingle", *args,
        ]  # fmt: skip
    if role == "beat":
        # The schedule lives in the database (django-celery-beat); no pid or schedule file.
        return [python, "-m", "celery", "-A", "emailops", "beat", "--loglevel", level,
                "--pidfile=", *args]  # fmt: skip
    if role == "worker":
        return [python, "-m", "sending.worker", *args]
    if role == "manage":
        return [python, str(Path(__file__).resolve().parent.parent / "manage.py"), *args]
    raise ValueError(f"role {role!r} does not exec a program")


def role_env(role: str, env) -> dict[str, str]:
    """The environment a role's program runs with."""
    env = dict(env)
    env.setdefault("DJANGO_SETTINGS_MODULE", "emailops.settings")
    if role == "conductor":
        # SIGTERM -> cold shutdown preceded by the soft shutdown (Celery 5.5+), instead of a
        # warm shutdown that waits for a stuck tick until ECS kills the task.
        env.setdefault("REMAP_SIGTERM", "SIGQUIT")
    return env


# --- web --------------------------------------------------------------------------------------


def _tls_files(env, folder: Path) -> tuple[str | None, str | None]:
    """TLS for the load-balancer-less setup: files (TLS_CERT_FILE/TLS_KEY_FILE), or PEM text in
    TLS_CERT/TLS_KEY (as ECS injects a secret), written into `folder` (only this user's)."""
    if env.get("TLS_CERT_FILE"):
        return env["TLS_CERT_FILE"], env.get("TLS_KEY_FILE") or None
    if not env.get("TLS_CERT"):
        return None, None
    if not env.get("TLS_KEY"):
        raise SystemExit("TLS_CERT is set but TLS_KEY is not")
    paths = []
    for name in ("TLS_CERT", "TLS_KEY"):
        path = folder / name.lower()
        path.touch(mode=0o600)
        path.write_text(env[name])
        paths.append(str(path))
    return paths[0], paths[1]


def web(env) -> int:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "emailops.settings")
    django.setup()
    try:
        registration = Registration.from_env(env)
    except RegistrationError as exc:
        print(f"emailops web: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="emailops-tls-") as folder:
        return _serve(env, registration, *_tls_files(env, Path(folder)))


def _serve(env, registration: Registration | None, certfile, keyfile) -> int:
    config = uvicorn.Config(
        "emailops.asgi:application",
        host=env.get("HOST", "0.0.0.0"),  # noqa: S104  (a container's own interface)
        port=_env_int(env, "PORT", 8000),
        lifespan="off",
        log_config=None,  # Django's LOGGING (plain or JSON) already configured the root logger
        # Requests are short; an idle TLS keep-alive connection (a worker's) would otherwise hold
        # the stop for asyncio's 30 s TLS shutdown timeout.
        timeout_graceful_shutdown=_env_int(env, "WEB_GRACEFUL_SHUTDOWN_S", 10),
        # Workers check in several times a second; the load balancer keeps access logs.
        access_log=env.get("WEB_ACCESS_LOG", "false").lower() in ("1", "true", "yes"),
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )
    server = WebServer(config, registration)
    # uvicorn re-raises the signal it stopped for once it is done, with the handlers it found:
    # a stop that ECS asked for is a clean exit.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _exit_cleanly)
    server.run()
    if server.failed is not None:
        print(f"emailops web: {server.failed}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


def _exit_cleanly(signum, frame):
    raise SystemExit(0)


class WebServer(uvicorn.Server):
    """uvicorn's Server, registering in Route 53 once it listens and deregistering (then
    draining for ROUTE53_DRAIN_S) on the first SIGTERM or SIGINT; a second signal stops at once."""

    def __init__(self, config: uvicorn.Config, registration: Registration | None):
        super().__init__(config)
        self.registration = registration
        self.failed: Exception | None = None
        self._draining = False

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        if self.should_exit or self.registration is None:
            return
        try:
            await asyncio.to_thread(self.registration.register)
        except RegistrationError as exc:
            log.error("%s", exc)
            self.failed = exc
            self.should_exit = True

    def handle_exit(self, sig, frame):
        registered = self.registration is not None and self.registration.registered
        if self._draining or not registered:
            return super().handle_exit(sig, frame)
        self._draining = True
        threading.Thread(
            target=self._drain, args=(sig, frame), name="deregister", daemon=True
        ).start()

    def _drain(self, sig, frame):
        try:
            self.registration.deregister()
        except Exception:
            log.exception("could not deregister from Route 53")
        else:
            log.info("deregistered; serving %.0f s more", self.registration.drain_s)
            deadline = time.monotonic() + self.registration.drain_s
            while time.monotonic() < deadline and not self.force_exit:
                time.sleep(0.1)
        super().handle_exit(sig, frame)

    def run(self, sockets=None):
        try:
            super().run(sockets=sockets)
        finally:
            if self.registration is not None and self.registration.registered:
                self.registration.deregister()


# --- migrate, healthcheck ---------------------------------------------------------------------


def migrate(args: list[str]) -> int:
    import django
    from django.core.management import call_command

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "emailops.settings")
    django.setup()
    # A configuration that fails the deploy checks stops the deploy here, before any service
    # is updated.
    call_command("check", deploy=True, databases=["default"], fail_level="ERROR")
    call_command("migrate", *args, interactive=False)
    return 0


def healthcheck(env) -> int:
    try:
        role = _role_path(env).read_text().strip()
    except OSError:
        print("no role has started in this container yet", file=sys.stderr)
        return 1
    if role == "web":
        tls = bool(env.get("TLS_CERT_FILE") or env.get("TLS_CERT"))
        url = f"{'https' if tls else 'http'}://127.0.0.1:{_env_int(env, 'PORT', 8000)}/healthz"
        # Our own certificate, checked on 127.0.0.1: its name cannot match.
        context = ssl._create_unverified_context() if tls else None  # noqa: S323
        try:
            with urllib.request.urlopen(url, timeout=10, context=context) as response:  # noqa: S310
                print(response.read().decode())
                return 0
        except Exception as exc:
            print(f"{url}: {exc}", file=sys.stderr)
            return 1
    if role == "conductor":
        # Alive means answering the broker's ping: a hung worker is replaced.
        host = f"conductor@{socket.gethostname()}"
        argv = [sys.executable, "-m", "celery", "-A", "emailops", "inspect", "ping",
                "--destination", host, "--timeout", "5"]  # fmt: skip
        return subprocess.run(argv, env=role_env("conductor", env), check=False).returncode
    return 0  # beat, migrate and worker have nothing to ask: they run or they have exited


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ROLES:
        print(__doc__, file=sys.stderr)
        return 2
    role, args = argv[0], argv[1:]
    env = os.environ
    if role == "healthcheck":
        return healthcheck(env)
    # On a read-only /tmp the health check reports the role as not started.
    with contextlib.suppress(OSError):
        _role_path(env).write_text(role)
    if role == "web":
        return web(env)
    if role == "migrate":
        return migrate(args)
    program = command(role, args, env)
    sys.stdout.flush()
    os.execve(program[0], program, role_env(role, env))  # noqa: S606
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
