"""/healthz through the ASGI server production runs, and `manage.py healthcheck`."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthz_is_200_when_the_database_and_redis_answer(asgi_server, redis_url):
    response = requests.get(f"{asgi_server.url}/healthz", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}
    assert response.headers["Cache-Control"] == "no-store"


def test_healthz_answers_any_host_over_plain_http_even_in_production(asgi_server, settings):
    # Load balancers ask by the task's IP address, over HTTP: neither ALLOWED_HOSTS nor the
    # HTTPS redirect may turn them away (the site itself still does).
    settings.SECURE_SSL_REDIRECT = True
    settings.ALLOWED_HOSTS = ["emailops.internal"]
    health = requests.get(
        f"{asgi_server.url}/healthz", headers={"Host": "10.40.2.17:8000"}, timeout=10
    )
    site = requests.get(
        f"{asgi_server.url}/admin/", headers={"Host": "10.40.2.17:8000"}, timeout=10
    )
    assert health.status_code == 200
    assert site.status_code == 400


def test_healthz_is_503_and_names_redis_when_redis_is_down(asgi_server, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    response = requests.get(f"{asgi_server.url}/healthz", timeout=30)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "failing"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"].startswith("ConnectionError")


def test_healthz_takes_only_get_and_head(asgi_server):
    assert requests.post(f"{asgi_server.url}/healthz", timeout=10).status_code == 405
    head = requests.head(f"{asgi_server.url}/healthz", timeout=10)
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize("reachable", [True, False])
def test_the_healthcheck_command_fails_when_the_database_is_unreachable(tmp_path, reachable):
    database = (
        f"sqlite:///{tmp_path / 'db.sqlite3'}"
        if reachable
        else f"postgres://postgres:s3cret-pw@127.0.0.1:{closed_port()}/nothing"
    )
    env = {**os.environ, "DATABASE_URL": database, "EMAILOPS_VAR_DIR": str(tmp_path)}
    env.pop("REDIS_URL", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "healthcheck"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if reachable:
        assert result.returncode == 0, result.stderr
        assert '"database": "ok"' in result.stdout
    else:
        assert result.returncode == 1
        assert "unhealthy: database: OperationalError" in result.stderr
        assert "s3cret-pw" not in result.stdout + result.stderr
