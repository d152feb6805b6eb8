"""The image, built and run here: `python -m deploy.image_test` (what `make image-test` runs).

Builds the real Dockerfile with deploy/local-image.sh (podman, a Debian base made with
mmdebstrap, a host-built wheelhouse), then runs its roles against this machine's PostgreSQL
(database `emailops_deploy`, dropped and made anew) and Redis (db 3, flushed) on the host
network:

1. `migrate` (its deploy checks, then the migrations), timed;
2. `web`, serving TLS itself with a certificate made for 127.0.0.1 (the load-balancer-less
   setup), timed from `podman run` to the first 200 from https://127.0.0.1:PORT/healthz;
3. `conductor` (local workers in threads, trusting that certificate) and `beat`;
4. a real send: a sandbox provider in this process (no cap of its own; the counts per window are
   checked here), a customer with a small cap per short window (SEND_WINDOW_MS) and a few hundred
   recipients, started with `sending.services.message_start`;
5. once a third of them are sent (`--sigterms N`: at N evenly spaced points), SIGTERM to the
   conductor, timed until its container exits; then a new conductor takes over and finishes;
6. at the provider: no window over the cap, no duplicate, every recipient terminal, and the
   database agreeing with what arrived; then SIGTERM to web and beat, each timed.

Prints its figures; the last line is one JSON object. Exits 1 if a check failed. Every container
it starts is removed at the end, whatever happens. Ports: PORT (default 8300) for web; the
sandbox binds an ephemeral one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "local-image.sh"
DB_NAME = os.environ.get("IMAGE_TEST_DB", "emailops_deploy")
PG = os.environ.get("IMAGE_TEST_PG", "postgres://postgres@127.0.0.1:5432")
REDIS = os.environ.get("IMAGE_TEST_REDIS", "redis://127.0.0.1:6379/3")
API_KEY = "image-test-key"


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} image-test: {text}", flush=True)


def sh(*args, check=True, capture=True, env=None, timeout=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        check=check,
        capture_output=capture,
        text=True,
        env=env,
        timeout=timeout,
    )


def local_image(*args, **kwargs) -> subprocess.CompletedProcess:
    return sh("bash", SCRIPT, *args, **kwargs)


def reset_services() -> None:
    import psycopg
    import redis

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    redis.Redis.from_url(REDIS).flushdb()


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: the worker API's TLS without a load balancer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "emailops image test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    # The container runs as another user; this key is a throwaway made for this run.
    for path in (folder, cert_path, key_path):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return cert_path, key_path


class Containers:
    """The containers of one run, removed at the end whatever happens."""

    def __init__(self, image: str, env_file: Path, certs: Path, logs: Path):
        self.image, self.env_file, self.certs, self.logs = image, env_file, certs, logs
        self.suffix = f"{os.getpid()}"
        self.names: list[str] = []

    def start(self, role: str, name: str, *, detach=True, extra_env=()) -> str | int:
        full = f"eo-image-test-{name}-{self.suffix}"
        args = [
            "run",
            "--name",
            full,
            "--network",
            "host",
            "--env-file",
            self.env_file,
            "-v",
            f"{self.certs}:/certs:ro",
            "--no-healthcheck",
        ]
        for item in extra_env:
            args += ["-e", item]
        self.names.append(full)
        if detach:
            local_image(*args, "-d", self.image, role)
            return full
        result = local_image(*args, self.image, role, check=False, timeout=600)
        (self.logs / f"{name}.log").write_text(result.stdout + result.stderr)
        return result.returncode

    def signal_and_wait(self, name: str, signal: str = "TERM") -> tuple[float, int]:
        """Seconds from the signal to the container's exit, and its exit code."""
        began = time.monotonic()
        sh("podman", "kill", "--signal", signal, name)
        code = sh("podman", "wait", name, timeout=180).stdout.strip()
        return time.monotonic() - began, int(code)

    def save_logs(self) -> None:
        for name in self.names:
            result = sh("podman", "logs", name, check=False)
            (self.logs / f"{name.split('-')[3]}-{name}.log").write_text(
                result.stdout + result.stderr
            )

    def remove(self) -> None:
        for name in self.names:
            sh("podman", "rm", "-f", "-t", "0", name, check=False)


def wait_for(predicate, timeout_s: float, every_s: float = 0.1, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")


def setup_django(env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ["DJANGO_SETTINGS_MODULE"] = "emailops.settings"
    import django

    django.setup()


def seed(*, sandbox_url: str, cap: int, recipients: int) -> int:
    from customers.models import ProviderAccount, SendLimit
    from customers.services import customer_create
    from sending.models import Message, Recipient

    account = ProviderAccount.objects.create(
        name="Image test sandbox",
        kind=ProviderAccount.Kind.SANDBOX,
        per_minute_cap=cap,
        settings={"api_url": sandbox_url},
        credentials={"api_key": API_KEY},
    )
    customer = customer_create(
        name="Image Test College",
        slug="image-test",
        default_from_email="news@image-test.example",
        provider_account=account,
        per_minute=cap,
    )
    SendLimit.objects.filter(customer=customer).update(batch_size=20, max_workers=2, concurrency=4)
    message = Message.objects.create(
        customer=customer,
        subject="Hello {{ first_name }}",
        text_body="Hi {{ first_name }}",
        html_body="<p>Hi {{ first_name }}</p>",
    )
    Recipient.objects.bulk_create(
        Recipient(message=message, email=f"s{i}@image-test.example", merge_data={"first_name": i})
        for i in range(recipients)
    )
    return message.pk


def counts(message_id: int) -> dict[str, int]:
    from django.db.models import Count

    from sending.models import Recipient

    rows = Recipient.objects.filter(message_id=message_id).values("status").annotate(n=Count("id"))
    return {row["status"]: row["n"] for row in rows}


def verify(message_id: int, sandbox, *, cap: int, window_ms: int) -> dict:
    from sending.models import Message, Recipient

    per_window: dict[int, int] = {}
    for send in sandbox.sends:
        per_window[send.arrived_ms // window_ms] = (
            per_window.get(send.arrived_ms // window_ms, 0) + 1
        )
    arrived = {send.idempotency_key for send in sandbox.sends}
    rows = dict(Recipient.objects.filter(message_id=message_id).values_list("id", "status"))
    sent = {str(pk) for pk, status in rows.items() if status == "sent"}
    unknown = {str(pk) for pk, status in rows.items() if status == "unknown"}
    return {
        "message_status": Message.objects.get(pk=message_id).status,
        "recipients": len(rows),
        "statuses": counts(message_id),
        "arrived": len(sandbox.sends),
        "duplicates": sum(1 for send in sandbox.sends if send.duplicate),
        "windows_over_cap": sum(1 for n in per_window.values() if n > cap),
        "max_per_window": max(per_window.values(), default=0),
        "not_terminal": sum(1 for s in rows.values() if s in ("queued", "leased")),
        "sent_not_arrived": len(sent - arrived),
        "arrived_not_sent_or_unknown": len(arrived - sent - unknown),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-build", action="store_true", help="use the image as it is")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8300")))
    parser.add_argument("--recipients", type=int, default=300)
    parser.add_argument("--cap", type=int, default=60, help="sends per window")
    parser.add_argument("--window-ms", type=int, default=10_000)
    parser.add_argument("--sigterms", type=int, default=1, help="conductor stops during the send")
    parser.add_argument("--logs", type=Path, default=ROOT / "var" / "image-test")
    args = parser.parse_args(argv)
    figures: dict = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    problems: list[str] = []

    if not args.skip_build:
        began = time.monotonic()
        result = local_image("build", check=False, capture=False)
        if result.returncode:
            print(json.dumps({"error": "the image did not build"}))
            return 1
        figures["build_s"] = round(time.monotonic() - began, 1)
    image = local_image("name").stdout.strip()
    figures["image"] = image
    figures["image_bytes"] = int(
        sh("podman", "image", "inspect", "--format", "{{.Size}}", image).stdout.strip()
    )

    # The image as built: its own user, code it cannot change, no secrets or local state.
    inside = local_image(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "id -u; test ! -e /app/var && echo no-var; touch /app/x 2>/dev/null || echo read-only; "
        "ls /app/staticfiles/admin >/dev/null && echo static",
        check=False,
    ).stdout.split()
    figures["image_checks"] = inside
    if inside != ["10001", "no-var", "read-only", "static"]:
        problems.append(f"image checks: {inside}")
    history = sh("podman", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    leaked = [w for w in ("PASSWORD", "TLS_KEY", "AWS_SECRET", "PRIVATE KEY") if w in history]
    if leaked:
        problems.append(f"the image's history names {leaked}")

    from cryptography.fernet import Fernet

    reset_services()
    args.logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="emailops-image-test-"))
    certs = work / "certs"
    certs.mkdir()
    make_certificate(certs)
    env = {
        "DATABASE_URL": f"{PG}/{DB_NAME}",
        "REDIS_URL": REDIS,
        "SECRET_KEY": Fernet.generate_key().decode() + "-image-test-secret-key",
        "FIELD_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "WORKER_TOKEN_KEY": Fernet.generate_key().decode() + "-image-test-worker-token-key",
        "UNSUBSCRIBE_KEY": Fernet.generate_key().decode(),
        "ANYMAIL_WEBHOOK_SECRET": "provider:" + Fernet.generate_key().decode(),
        "PUBLIC_BASE_URL": "https://mail.emailops.example",  # unsubscribe links must be https
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "HOST": "127.0.0.1",
        "PORT": str(args.port),
        "TLS_CERT_FILE": "/certs/cert.pem",
        "TLS_KEY_FILE": "/certs/key.pem",
        "REQUESTS_CA_BUNDLE": "/certs/cert.pem",
        "WORKER_API_URL": f"https://127.0.0.1:{args.port}/api/worker/v1/",
        "WORKER_RUNTIME": "local",
        "LOCAL_WORKER_MODE": "thread",
        "LOCAL_WORKER_TIMEOUT_S": "60",
        "SEND_WINDOW_MS": str(args.window_ms),
        "SEND_TIMEOUT_MS": "2000",
        "WORKER_DEADLINE_MARGIN_MS": "3000",
        "WATCHDOG_S": "2",
        "LOG_LEVEL": "INFO",
    }
    env_file = work / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    env_file.chmod(0o600)
    containers = Containers(image, env_file, certs, args.logs)
    from sending.sandbox import SandboxServer

    sandbox = SandboxServer(host="127.0.0.1", port=0, caps={API_KEY: None}).start()
    try:
        began = time.monotonic()
        code = containers.start("migrate", "migrate", detach=False)
        figures["migrate_s"] = round(time.monotonic() - began, 1)
        if code:
            problems.append(f"migrate exited {code}")
            raise RuntimeError("migrate failed")

        import requests

        url = f"https://127.0.0.1:{args.port}/healthz"
        began = time.monotonic()
        web = containers.start("web", "web")

        def healthy():
            try:
                return (
                    requests.get(url, verify=str(certs / "cert.pem"), timeout=2).status_code == 200
                )
            except requests.RequestException:
                return False

        wait_for(healthy, 60, 0.05, "web's /healthz")
        figures["web_start_to_healthz_s"] = round(time.monotonic() - began, 2)
        conductor = containers.start("conductor", "conductor")
        beat = containers.start("beat", "beat")

        setup_django(env)
        from sending import services

        message_id = seed(sandbox_url=sandbox.url, cap=args.cap, recipients=args.recipients)
        began = time.monotonic()
        services.message_start(message_id=message_id)
        log(f"message {message_id} started: {args.recipients} recipients, {args.cap} a window")
        stops = []
        for n in range(1, args.sigterms + 1):
            # Stop the conductor at evenly spaced points of the send, while it ticks.
            target = args.recipients * n // (args.sigterms + 2)
            wait_for(
                lambda target=target: counts(message_id).get("sent", 0) >= target,
                180,
                0.2,
                f"{target} recipients sent",
            )
            log(f"SIGTERM to the conductor at {counts(message_id)}")
            seconds, code = containers.signal_and_wait(conductor)
            stops.append({"seconds": round(seconds, 2), "exit_code": code})
            log(f"conductor exited {code} after {seconds:.2f} s")
            conductor = containers.start("conductor", f"conductor{n + 1}")
        figures["conductor_sigterm_to_exit_s"] = max(stop["seconds"] for stop in stops)
        figures["conductor_stops"] = stops

        from sending.models import Message

        wait_for(
            lambda: Message.objects.get(pk=message_id).status == Message.Status.COMPLETED,
            300,
            0.5,
            "the message to complete",
        )
        figures["send_s"] = round(time.monotonic() - began, 1)
        checked = verify(message_id, sandbox, cap=args.cap, window_ms=args.window_ms)
        figures["send"] = checked
        if checked["message_status"] != "completed":
            problems.append("message not completed")
        for key in (
            "duplicates",
            "windows_over_cap",
            "not_terminal",
            "sent_not_arrived",
            "arrived_not_sent_or_unknown",
        ):
            if checked[key]:
                problems.append(f"{key}: {checked[key]}")
        for name, container in (("web", web), ("beat", beat)):
            seconds, code = containers.signal_and_wait(container)
            figures[f"{name}_sigterm_to_exit_s"] = round(seconds, 2)
            figures[f"{name}_exit_code"] = code
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        containers.save_logs()
        containers.remove()
        sandbox.stop()
        shutil.rmtree(work, ignore_errors=True)
    figures["problems"] = problems
    figures["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(figures))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
