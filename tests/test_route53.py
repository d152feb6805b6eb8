"""Route 53 self-registration (emailops/route53.py) and the web role that uses it: a fake ECS
task metadata endpoint (real HTTP on 127.0.0.1) and moto's Route 53 server."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
import requests

from emailops.route53 import Registration, RegistrationError, read_task_address
from tests.aws import moto_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
ZONE_NAME = "internal.example.edu"
RECORD = "workers.internal.example.edu."


class FakeMetadata:
    """ECS's task metadata endpoint v4: `/` is this container, `/task` the task."""

    def __init__(self, *, task_id: str, ipv4: str):
        self.task_id, self.ipv4 = task_id, ipv4
        self.requests = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake.requests += 1
                arn = f"arn:aws:ecs:us-east-1:123456789012:task/emailops/{fake.task_id}"
                container = {"Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": [fake.ipv4]}]}
                body = json.dumps({"TaskARN": arn} if self.path == "/task" else container).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metadata():
    servers = []

    def make(task_id="0f1e2d3c4b5a", ipv4="10.40.2.17"):
        servers.append(FakeMetadata(task_id=task_id, ipv4=ipv4))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def zone(moto_server):  # noqa: F811
    route53 = boto3.client("route53")
    zone_id = route53.create_hosted_zone(
        Name=ZONE_NAME,
        CallerReference=str(time.time()),
        HostedZoneConfig={"PrivateZone": True, "Comment": "test"},
        VPC={"VPCRegion": "us-east-1", "VPCId": "vpc-12345678"},
    )["HostedZone"]["Id"].rsplit("/", 1)[-1]
    return zone_id


def records(zone_id):
    sets = boto3.client("route53").list_resource_record_sets(HostedZoneId=zone_id)
    return [r for r in sets["ResourceRecordSets"] if r["Type"] == "A"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registration(zone_id, uri, **kw):
    env = {
        "ROUTE53_ZONE_ID": zone_id,
        "ROUTE53_RECORD_NAME": RECORD.rstrip("."),
        "ECS_CONTAINER_METADATA_URI_V4": uri,
        "ROUTE53_TTL": "10",
        **kw,
    }
    return Registration.from_env(env)


def test_each_task_keeps_its_own_multivalue_record_and_deletes_only_its_own(zone, metadata):
    first = registration(zone, metadata(task_id="task-a", ipv4="10.40.2.17").uri)
    second = registration(zone, metadata(task_id="task-b", ipv4="10.40.3.9").uri)

    first.register()
    second.register()

    found = {r["SetIdentifier"]: r for r in records(zone)}
    assert set(found) == {"task-a", "task-b"}
    assert found["task-a"]["ResourceRecords"] == [{"Value": "10.40.2.17"}]
    assert found["task-b"]["ResourceRecords"] == [{"Value": "10.40.3.9"}]
    for record in found.values():
        assert record["Name"] == RECORD
        assert record["TTL"] == 10
        assert record["MultiValueAnswer"] is True

    first.deregister()
    assert [r["SetIdentifier"] for r in records(zone)] == ["task-b"]
    first.deregister()  # a second call changes nothing
    assert [r["SetIdentifier"] for r in records(zone)] == ["task-b"]


def test_a_weighted_record_when_asked(zone, metadata):
    reg = registration(zone, metadata().uri, ROUTE53_ROUTING="weighted")
    reg.register()
    (record,) = records(zone)
    assert record["Weight"] == 1 and "MultiValueAnswer" not in record


def test_registering_again_after_a_restart_replaces_the_same_record(zone, metadata):
    server = metadata(task_id="task-a", ipv4="10.40.2.17")
    registration(zone, server.uri).register()
    server.ipv4 = "10.40.2.99"  # the same task id, a new address
    registration(zone, server.uri).register()
    (record,) = records(zone)
    assert record["ResourceRecords"] == [{"Value": "10.40.2.99"}]


def test_an_unreachable_metadata_endpoint_is_a_clear_error_after_retries():
    uri = f"http://127.0.0.1:{closed_port()}/v4/abc"
    began = time.monotonic()
    with pytest.raises(RegistrationError, match=r"reading the task metadata at .* attempts"):
        read_task_address(uri, timeout_s=1.5)
    assert time.monotonic() - began >= 1.5  # it did retry, for as long as it was told


def test_without_the_metadata_variable_the_error_says_what_is_missing(zone):
    with pytest.raises(RegistrationError, match="ECS_CONTAINER_METADATA_URI_V4 is not set"):
        registration(zone, "").register()


def test_an_unreachable_route53_is_a_clear_error_after_retries(metadata, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    reg = registration("Z123", metadata().uri, ROUTE53_TIMEOUT_S="1.5")
    with pytest.raises(RegistrationError, match=r"UPSERT of workers.* still failing"):
        reg.register()
    assert not reg.registered


def test_a_refusal_by_route53_is_not_retried(zone, metadata):
    reg = registration("ZNOSUCHZONE", metadata().uri, ROUTE53_TIMEOUT_S="30")
    began = time.monotonic()
    with pytest.raises(RegistrationError, match="Route 53 refused"):
        reg.register()
    assert time.monotonic() - began < 10


def test_bad_settings_are_refused_before_anything_is_called():
    assert Registration.from_env({}) is None  # not asked for
    with pytest.raises(RegistrationError, match="ROUTE53_RECORD_NAME"):
        Registration.from_env({"ROUTE53_ZONE_ID": "Z1"})
    with pytest.raises(RegistrationError, match="ROUTE53_ROUTING"):
        Registration.from_env(
            {"ROUTE53_ZONE_ID": "Z1", "ROUTE53_RECORD_NAME": "a.b", "ROUTE53_ROUTING": "latency"}
        )


# --- the web role, as the container runs it ----------------------------------------------------


def start_web(tmp_path, extra_env):
    port = closed_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        "DEBUG": "true",
        "EMAILOPS_VAR_DIR": str(tmp_path),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "EMAILOPS_RUN_DIR": str(tmp_path),
        **extra_env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "emailops.entrypoint", "web"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, f"http://127.0.0.1:{port}"


def wait_until(predicate, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def healthy(url):
    try:
        return requests.get(f"{url}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_the_web_role_registers_once_it_serves_and_deregisters_on_sigterm(
    tmp_path,
    zone,
    metadata,
    moto_server,  # noqa: F811
):
    server = metadata(task_id="task-web", ipv4="10.40.2.50")
    process, url = start_web(
        tmp_path,
        {
            **moto_server.env,
            "ROUTE53_ZONE_ID": zone,
            "ROUTE53_RECORD_NAME": RECORD,
            "ECS_CONTAINER_METADATA_URI_V4": server.uri,
            "ROUTE53_DRAIN_S": "1",
        },
    )
    try:
        assert wait_until(lambda: healthy(url) and records(zone)), process
        assert [r["SetIdentifier"] for r in records(zone)] == ["task-web"]

        process.send_signal(signal.SIGTERM)
        # Deregistered first, while it still serves for the drain time.
        assert wait_until(lambda: not records(zone), 10)
        assert healthy(url)
        assert process.wait(20) == 0
    finally:
        process.kill()
        output = process.communicate()[0]
    assert "deregistered" in output


def test_the_web_role_exits_non_zero_when_it_cannot_register(tmp_path, zone):
    process, _ = start_web(
        tmp_path,
        {
            "ROUTE53_ZONE_ID": zone,
            "ROUTE53_RECORD_NAME": RECORD,
            "ROUTE53_TIMEOUT_S": "1",
            "ECS_CONTAINER_METADATA_URI_V4": f"http://127.0.0.1:{closed_port()}/v4",
        },
    )
    try:
        code = process.wait(60)
    finally:
        process.kill()
        output = process.communicate()[0]
    assert code == 1
    assert "reading the task metadata" in output and "still failing" in output
