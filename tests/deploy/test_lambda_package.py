"""The worker function's zip (deploy/lambda_build.py): what it holds, and the handler run from it
with nothing but the zip and the standard library on sys.path, against the worker API served by
uvicorn and a real sandbox provider."""

import json
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from customers.models import SendLimit
from deploy import lambda_build
from sending import checkin
from sending.models import Message, Recipient
from sending.models import Worker as WorkerRow
from sending.sandbox import SandboxServer
from tests.factories import CustomerFactory, ProviderAccountFactory

API_KEY = "lambda-zip-key"
# Wheel platform tags that load on glibc 2.26 (Amazon Linux 2, Lambda's python3.11).
LAMBDA_GLIBC = (2, 26)
LOADABLE = ("any", "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64")


@pytest.fixture(scope="session")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("lambda") / "emailops-worker.zip"
    summary = lambda_build.build(out)
    unzipped = out.parent / "unzipped"
    with zipfile.ZipFile(out) as archive:
        archive.extractall(unzipped)
    return summary, out, unzipped


def test_the_zip_holds_the_handler_and_no_database_code(package):
    summary, out, unzipped = package
    assert summary["handler"] == "sending.worker.handler"
    for package in ("worker", "providers"):
        assert (unzipped / "sending" / package / "__init__.py").is_file(), package
    assert (unzipped / "sending" / "providers" / "smtp.py").is_file()  # imported lazily
    # Derived from the imports: the models, the API and the settings never reach the zip.
    for absent in (
        "sending/models.py",
        "sending/checkin.py",
        "sending/worker/__main__.py",
        "customers",
        "emailops",
        "manage.py",
    ):
        assert not (unzipped / absent).exists(), absent
    names = {name.lower() for name in summary["distributions"]}
    assert {"django", "requests", "django-anymail", "boto3"} <= names
    for dev_only in ("pytest", "moto", "psycopg", "celery", "channels", "uvicorn"):
        assert dev_only not in names
    assert summary["zip_bytes"] == out.stat().st_size < 50 * 1024 * 1024  # Lambda's zip limit


def test_every_wheel_in_the_zip_loads_on_the_lambda_runtimes_glibc(package):
    _, _, unzipped = package
    wheels = list(unzipped.glob("*.dist-info/WHEEL"))
    assert wheels
    for wheel in wheels:
        tags = [
            line.split(":", 1)[1].strip()
            for line in wheel.read_text().splitlines()
            if line.startswith("Tag:")
        ]
        platforms = {tag.rsplit("-", 1)[-1] for tag in tags}
        assert any(
            part in LOADABLE or part.startswith("manylinux_2_17")
            for platform in platforms
            for part in platform.split(".")
        ), (wheel.parent.name, platforms)
    # And what the shared objects really ask of the C library (the tag could lie).
    shared = list(unzipped.rglob("*.so*"))
    assert shared
    for path in shared:
        symbols = subprocess.run(
            ["objdump", "-T", str(path)], capture_output=True, text=True, check=True
        ).stdout
        needed = {tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_(\d+\.\d+)", symbols)}
        assert max(needed, default=(2, 0)) <= LAMBDA_GLIBC, (path.name, max(needed))


def test_two_builds_of_the_same_sources_give_the_same_bytes(package, tmp_path):
    _, out, _ = package
    again = tmp_path / "again.zip"
    lambda_build.build(again)
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.django_db(transaction=True)
def test_the_handler_sends_a_message_from_the_unzipped_package(package, asgi_server, settings):
    _, _, unzipped = package
    settings.SEND_WINDOW_MS = 2_000
    settings.SEND_TIMEOUT_MS = 1_000
    sandbox = SandboxServer(caps={API_KEY: 100_000}).start()
    try:
        account = ProviderAccountFactory(
            settings={"api_url": sandbox.url},
            credentials={"api_key": API_KEY},
            per_minute_cap=1_000,
        )
        customer = CustomerFactory(provider_account=account)
        SendLimit.objects.filter(customer=customer).update(
            per_minute=1_000, batch_size=20, concurrency=4, max_workers=1
        )
        message = Message.objects.create(
            customer=customer,
            subject="Hello {{ first_name }}",
            text_body="Hi {{ first_name }}",
            html_body="<p>Hi {{ first_name }}</p>",
            status=Message.Status.SENDING,
            started_at=checkin.Clock.read().now,
        )
        Recipient.objects.bulk_create(
            Recipient(message=message, email=f"s{i}@zip.example", merge_data={"first_name": i})
            for i in range(45)
        )
        worker, token = checkin.worker_start(customer_id=customer.pk)
        event = {
            "api_url": f"{asgi_server.url}/api/worker/v1/",
            "token": token,
            "worker_id": worker.pk,
        }
        summary = run_from_zip(unzipped, event)
    finally:
        sandbox.stop()

    assert summary["stop"] == "done", summary
    assert (summary["sent"], summary["failed"], summary["unknown"]) == (45, 0, 0)
    rows = list(Recipient.objects.filter(message=message))
    assert {r.status for r in rows} == {"sent"}
    arrived = sorted(send.idempotency_key for send in sandbox.sends)
    assert arrived == sorted(str(r.pk) for r in rows)  # each once, none missing
    assert sandbox.report()["duplicates"] == {}
    assert WorkerRow.objects.get(pk=worker.pk).state == "stopped"


RUNNER = r"""
import json, sys
sys.path[:] = [sys.argv[1], *json.loads(sys.argv[2])]
from sending.worker import LocalContext, handler
import sending.worker, django
for name in ("sending.worker", "django"):
    module = sys.modules[name]
    assert module.__file__.startswith(sys.argv[1]), (name, module.__file__)
event = json.loads(sys.stdin.read())
print(json.dumps(handler(event, LocalContext(30))))
"""


def run_from_zip(unzipped: Path, event: dict) -> dict:
    """The handler in a process whose sys.path is the package and the standard library only."""
    stdlib = [
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["platstdlib"],
        str(Path(sysconfig.get_paths()["stdlib"]) / "lib-dynload"),
    ]
    env = {
        "PATH": "/usr/bin:/bin",
        "WORKER_DEADLINE_MARGIN_MS": "1000",
        "WORKER_SEND_MARGIN_MS": "300",
        "WORKER_API_BACKOFF_MS": "50",
        "LOG_LEVEL": "WARNING",
    }
    result = subprocess.run(
        [sys.executable, "-S", "-E", "-s", "-c", RUNNER, str(unzipped), json.dumps(stdlib)],
        input=json.dumps(event),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
