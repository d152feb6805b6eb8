"""The image's entry point (emailops/entrypoint.py), run as the container runs it."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from deploy.image_test import make_certificate
from emailops import entrypoint
from tests.net import free_port

ROOT = Path(__file__).resolve().parent.parent


def role_process(role, tmp_path, **env):
    full = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)},
        "DEBUG": "true",
        "EMAILOPS_VAR_DIR": str(tmp_path),
        "EMAILOPS_RUN_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "emailops.entrypoint", role],
        cwd=ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ), full


def container_healthcheck(env) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK, in a process of its own as Docker or ECS runs it."""
    return subprocess.run(
        [sys.executable, "-m", "emailops.entrypoint", "healthcheck"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_conductor_execs_celery_with_soft_shutdown_on_sigterm():
    command = entrypoint.command("conductor", [], {"CONDUCTOR_CONCURRENCY": "4"})
    assert command[1:6] == ["-m", "celery", "-A", "emailops", "worker"]
    assert command[command.index("--pool") + 1] == "threads"
    assert command[command.index("--concurrency") + 1] == "4"
    assert entrypoint.role_env("conductor", {})["REMAP_SIGTERM"] == "SIGQUIT"
    assert "REMAP_SIGTERM" not in entrypoint.role_env("beat", {})
    assert entrypoint.command("beat", [], {})[5:7] == ["beat", "--loglevel"]


def test_an_unknown_role_prints_the_roles_and_fails(capsys):
    assert entrypoint.main(["nginx"]) == 2
    assert "conductor" in capsys.readouterr().err


def test_the_health_check_knows_no_role_until_one_started(tmp_path):
    env = {"EMAILOPS_RUN_DIR": str(tmp_path)}
    assert entrypoint.healthcheck(env) == 1
    (tmp_path / entrypoint.ROLE_FILE).write_text("beat")
    assert entrypoint.healthcheck(env) == 0


def test_the_web_role_serves_tls_from_pem_secrets_and_stops_cleanly_on_sigterm(tmp_path):
    cert, key = make_certificate(tmp_path)
    port = free_port()
    process, env = role_process(
        "web",
        tmp_path,
        HOST="127.0.0.1",
        PORT=str(port),
        WEB_GRACEFUL_SHUTDOWN_S="3",
        TLS_CERT=cert.read_text(),
        TLS_KEY=key.read_text(),
    )
    url = f"https://127.0.0.1:{port}/healthz"
    # A worker's keep-alive connection, still open when the task is told to stop.
    session = requests.Session()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = session.get(url, verify=str(cert), timeout=1)
                break
            except requests.RequestException:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        assert response.status_code == 200
        # The container's HEALTHCHECK, in a process of its own as Docker runs it.
        check = container_healthcheck(env)
        assert check.returncode == 0, check.stderr
        assert '"database": "ok"' in check.stdout
        # The key from the secret was written where only this user can read it.
        (written,) = [
            p
            for p in Path(tempfile.gettempdir()).glob("emailops-tls-*/tls_key")
            if p.stat().st_uid == os.getuid() and key.read_text() == p.read_text()
        ]
        assert written.stat().st_mode & 0o077 == 0
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert not written.exists()  # and removed at exit
        # Bounded by WEB_GRACEFUL_SHUTDOWN_S, however long the client keeps its connection.
        assert time.monotonic() - began < 3 + 5
    finally:
        session.close()
        process.kill()
        process.communicate()
    # Whatever happened above, this run's key is not left behind, and no key file anyone's run
    # left is readable by others. (This asserted `written and …`: true only on a machine where an
    # earlier run had left a key behind, so it failed on a clean one.)
    left = [
        p for p in Path("/tmp").glob("emailops-tls-*/tls_key") if p.stat().st_uid == os.getuid()
    ]
    assert all(p.read_text() != key.read_text() for p in left)
    assert all(p.stat().st_mode & 0o077 == 0 for p in left)


def test_the_conductor_answers_its_health_check_and_stops_on_sigterm_through_soft_shutdown(
    tmp_path, redis_url
):
    process, env = role_process(
        "conductor",
        tmp_path,
        REDIS_URL=redis_url,
        CONDUCTOR_CONCURRENCY="2",
        CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT="3",
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while not any("ready." in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(lines)
            lines.append(line)
        # The container's health check pings this very worker through the broker.
        check = container_healthcheck(env)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "pong" in check.stdout
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
        seconds = time.monotonic() - began
    finally:
        process.kill()
    # SIGTERM was remapped to the cold shutdown that Celery's soft shutdown precedes.
    assert "Cold shutdown" in output
    assert seconds < 30
    assert process.returncode is not None


@pytest.mark.parametrize("role", ["migrate"])
def test_migrate_runs_the_deploy_checks_first_and_stops_on_an_error(tmp_path, role):
    process, _ = role_process(
        role,
        tmp_path,
        DEBUG="false",
        SECRET_KEY="x" * 60,
        ALLOWED_HOSTS="emailops.internal",
        FIELD_ENCRYPTION_KEY="not-a-fernet-key",
        UNSUBSCRIBE_KEY="y" * 60,
        ANYMAIL_WEBHOOK_SECRET="provider:" + "z" * 40,
    )
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0
    assert "emailops.E004" in output
    assert not (tmp_path / "db.sqlite3").exists() or "Applying" not in output
