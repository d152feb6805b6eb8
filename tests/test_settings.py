import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent

PRODUCTION_ENV = {
    "DEBUG": "false",
    "SECRET_KEY": "x" * 20 + "-production-secret-key-with-enough-entropy-0123456789",
    "FIELD_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    "WORKER_TOKEN_KEY": "y" * 20 + "-production-worker-token-key-0123456789",
    "UNSUBSCRIBE_KEY": "unsubscribe-links-key-" + "y" * 40,
    "ANYMAIL_WEBHOOK_SECRET": "provider:webhook-secret-" + "z" * 30,
    "PUBLIC_BASE_URL": "https://mail.emailops.example",
    "ALLOWED_HOSTS": "emailops.internal",
    "CSRF_TRUSTED_ORIGINS": "https://emailops.internal",
}


def _manage(*args, env):
    """manage.py with the project's own settings (not the tests', which set DEBUG=true)."""
    clean = {k: v for k, v in os.environ.items() if k not in PRODUCTION_ENV}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "emailops.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_with_production_values(tmp_path):
    result = _manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        env={**PRODUCTION_ENV, "EMAILOPS_VAR_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


PRODUCTION_SETTINGS = {
    "DEBUG": False,
    "SECURE_SSL_REDIRECT": True,
    "SESSION_COOKIE_SECURE": True,
    "CSRF_COOKIE_SECURE": True,
    "SECURE_HSTS_SECONDS": 31_536_000,
    "ALLOWED_HOSTS": ["emailops.internal"],
}


def _settings_of(env) -> dict:
    names = ", ".join(f"{name!r}: settings.{name}" for name in PRODUCTION_SETTINGS)
    result = _manage(
        "shell", "--no-imports", "-c",
        f"from django.conf import settings; print(repr({{{names}}}))",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return eval(result.stdout.strip())  # noqa: S307 - our own repr of a dict


def test_debug_unset_means_production(tmp_path):
    env = {k: v for k, v in PRODUCTION_ENV.items() if k != "DEBUG"}
    clean = {k: v for k, v in os.environ.items() if k != "DEBUG"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "emailops.settings", **env,
             "EMAILOPS_VAR_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DEBUG" not in {**clean, **env}
    assert _settings_of({**env, "EMAILOPS_VAR_DIR": str(tmp_path)}) == PRODUCTION_SETTINGS
    # Nothing was generated: production never makes its own keys.
    assert list(tmp_path.iterdir()) == []


def test_debug_unset_without_secrets_refuses_to_start(tmp_path):
    clean = {k: v for k, v in os.environ.items() if k not in {*PRODUCTION_ENV, "DEBUG"}}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "emailops.settings",
             "EMAILOPS_VAR_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is off" in result.stderr


def test_production_without_a_worker_token_key_fails_its_checks(tmp_path):
    env = {**PRODUCTION_ENV, "WORKER_TOKEN_KEY": "", "EMAILOPS_VAR_DIR": str(tmp_path)}
    result = _manage("check", env=env)
    assert result.returncode != 0
    assert "emailops.E005" in result.stderr + result.stdout
    assert "WORKER_TOKEN_KEY is not set" in result.stderr + result.stdout


@pytest.mark.parametrize(
    "missing", ["SECRET_KEY", "FIELD_ENCRYPTION_KEY", "UNSUBSCRIBE_KEY", "ANYMAIL_WEBHOOK_SECRET"]
)
def test_production_refuses_to_start_without_its_secrets(tmp_path, missing):
    env = {**PRODUCTION_ENV, "EMAILOPS_VAR_DIR": str(tmp_path)}
    env[missing] = ""
    result = _manage("check", env=env)
    assert result.returncode != 0
    assert f"{missing} must be set when DEBUG is off" in result.stderr


def test_development_generates_a_secret_key_once_and_keeps_it(tmp_path):
    env = {"DEBUG": "true", "EMAILOPS_VAR_DIR": str(tmp_path), "SECRET_KEY": ""}
    assert _manage("check", env=env).returncode == 0
    first = (tmp_path / "secret_key").read_text()
    assert _manage("check", env=env).returncode == 0
    assert (tmp_path / "secret_key").read_text() == first
    assert len(first) >= 50


ENGINE_DEFAULTS = {
    "WORKER_API_URL": "http://127.0.0.1:8000/api/worker/v1/",
    "WORKER_RUNTIME": "local",
    "CONDUCTOR_MAX_STARTS_PER_TICK": 3,
    "WORKER_START_TIMEOUT_S": 60.0,
    "WORKER_WARMUP_MS": 3000,
}


def _settings_repr(expression: str, env: dict[str, str]) -> str:
    """repr() of a settings expression, as a development process with `env` computes it."""
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c",
         f"from django.conf import settings; print(repr({expression}))"],
        cwd=ROOT,
        env={**env, "DEBUG": "true"},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_engine_settings_have_their_defaults_without_the_environment(tmp_path):
    names = ", ".join(f"{name!r}: settings.{name}" for name in ENGINE_DEFAULTS)
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_DEFAULTS}
    shown = _settings_repr(f"{{{names}}}", {**env, "EMAILOPS_VAR_DIR": str(tmp_path)})
    assert eval(shown) == ENGINE_DEFAULTS  # noqa: S307 - our own repr of a dict


def test_check_deploy_refuses_a_plain_http_public_url(tmp_path):
    env = {**PRODUCTION_ENV, "EMAILOPS_VAR_DIR": str(tmp_path)}
    env["PUBLIC_BASE_URL"] = "http://mail.emailops.example"
    result = _manage("check", "--deploy", env=env)
    assert result.returncode != 0
    assert "emailops.E010" in result.stderr + result.stdout


@pytest.mark.parametrize(("value", "threshold"), [(None, 5), ("false", None)])
def test_prepared_statements_are_on_unless_turned_off(tmp_path, value, threshold):
    """On PostgreSQL, psycopg may prepare (sending/prepared.py) unless the environment says no
    (a pooler in transaction mode); Django's own default, None, prepares nothing."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_PREPARED_STATEMENTS"}
    if value is not None:
        env["DATABASE_PREPARED_STATEMENTS"] = value
    env |= {
        "EMAILOPS_VAR_DIR": str(tmp_path),
        "DATABASE_URL": "postgres://emailops@db.invalid:5432/emailops",
    }
    shown = _settings_repr("settings.DATABASES['default']['OPTIONS'].get('prepare_threshold')", env)
    assert shown == repr(threshold)
