"""How workers are invoked: the runtime chosen by settings, AWS Lambda (offline, through moto),
and the local runtime running the real handler against the real API (uvicorn, ASGI)."""

import io
import json
import subprocess
import sys
import time
import urllib.request
import zipfile

import boto3
import pytest
from django.core.exceptions import ImproperlyConfigured
from moto import mock_aws
from moto.awslambda_simple.models import LambdaSimpleBackend

from sending import runtimes
from sending.models import Recipient
from sending.runtimes import LambdaRuntime, LocalRuntime, get_runtime, local_invocation
from tests.factories import assert_sent_once_each, make_message, sandbox_customer, start_worker
from tests.net import free_port

REGION = "eu-west-1"
FUNCTION = "emailops-worker"


# --- choosing a runtime ------------------------------------------------------------------------


def test_the_runtime_is_chosen_by_settings_read_at_call_time(settings):
    settings.WORKER_RUNTIME = "local"
    settings.LOCAL_WORKER_MODE = "process"
    settings.LOCAL_WORKER_TIMEOUT_S = 12
    runtime = get_runtime()
    assert isinstance(runtime, LocalRuntime)
    assert (runtime.name, runtime.mode, runtime.timeout_s) == ("local", "process", 12)

    settings.WORKER_RUNTIME = "lambda"
    settings.LAMBDA_FUNCTION_NAME = FUNCTION
    settings.AWS_REGION = REGION
    runtime = get_runtime()
    assert isinstance(runtime, LambdaRuntime)
    assert (runtime.name, runtime.function_name, runtime.region) == ("lambda", FUNCTION, REGION)
    assert runtime._client is None  # boto3 is built on first use, not before

    settings.LAMBDA_FUNCTION_NAME = ""
    with pytest.raises(ImproperlyConfigured, match="LAMBDA_FUNCTION_NAME"):
        get_runtime()
    settings.WORKER_RUNTIME = "docker"
    with pytest.raises(ImproperlyConfigured, match="WORKER_RUNTIME"):
        get_runtime()
    settings.WORKER_RUNTIME = "local"
    settings.LOCAL_WORKER_MODE = "fork"
    with pytest.raises(ImproperlyConfigured, match="LOCAL_WORKER_MODE"):
        get_runtime()


def test_the_worker_api_url_is_read_at_call_time(settings):
    settings.WORKER_API_URL = "https://emailops.example/api/worker/v1/"
    assert runtimes.worker_api_url() == "https://emailops.example/api/worker/v1/"


# --- AWS Lambda, offline -----------------------------------------------------------------------


def _function_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("worker.py", "def handler(event, context):\n    return event\n")
    return buffer.getvalue()


@pytest.fixture
def lambda_function(monkeypatch):
    """A worker function in moto's Lambda (no Docker: the code does not run there), with every
    invocation it receives recorded as moto's backend saw it."""
    received = []
    original = LambdaSimpleBackend.invoke

    def record(self, function_name, qualifier, body, headers, response_headers):
        received.append(
            {
                "function": function_name,
                "type": headers.get("X-Amz-Invocation-Type"),
                "payload": json.loads(body),
            }
        )
        return original(self, function_name, qualifier, body, headers, response_headers)

    monkeypatch.setattr(LambdaSimpleBackend, "invoke", record)
    with mock_aws(config={"lambda": {"use_docker": False}}):
        iam = boto3.client("iam", region_name=REGION)
        role = iam.create_role(
            RoleName="emailops-worker",
            AssumeRolePolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "lambda.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
        )["Role"]
        boto3.client("lambda", region_name=REGION).create_function(
            FunctionName=FUNCTION,
            Runtime="python3.12",
            Role=role["Arn"],
            Handler="worker.handler",
            Code={"ZipFile": _function_zip()},
            Timeout=900,
        )
        yield received


def test_lambda_runtime_queues_the_worker_event(lambda_function, settings):
    settings.WORKER_RUNTIME = "lambda"
    settings.LAMBDA_FUNCTION_NAME = FUNCTION
    settings.AWS_REGION = REGION
    runtime = get_runtime()

    request_id = runtime.invoke(
        api_url="https://emailops.example/api/worker/v1/", token="tok-123", worker_id=42
    )

    assert isinstance(request_id, str) and request_id
    assert lambda_function == [
        {
            "function": FUNCTION,
            "type": "Event",
            "payload": {
                "api_url": "https://emailops.example/api/worker/v1/",
                "token": "tok-123",
                "worker_id": 42,
            },
        }
    ]
    assert runtime.client.meta.region_name == REGION


def test_lambda_runtime_fails_loudly_when_lambda_does_not_queue_the_event():
    class Client:
        def invoke(self, **kwargs):
            return {"StatusCode": 200, "ResponseMetadata": {"RequestId": "r-1"}}

    runtime = LambdaRuntime(function_name=FUNCTION, region=REGION, client=Client())
    with pytest.raises(RuntimeError, match="did not queue worker 7: status 200"):
        runtime.invoke(api_url="https://x.example/", token="t", worker_id=7)


# --- the local runtime, against the real API -----------------------------------------------------


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_local_runtime_runs_the_real_handler(mode, api_url, sandbox, settings):
    settings.WORKER_RUNTIME = "local"
    settings.LOCAL_WORKER_MODE = mode
    settings.LOCAL_WORKER_TIMEOUT_S = 20
    customer = sandbox_customer(sandbox, batch_size=10)
    message = make_message(customer, 25)
    worker, event = start_worker(customer, api_url)

    request_id = get_runtime().invoke(**event)

    invocation = local_invocation(request_id)
    assert invocation.mode == mode and invocation.worker_id == worker.pk
    assert invocation.join(timeout=25), "the local worker did not finish"
    assert invocation.error is None
    assert invocation.result["stop"] == "done", invocation.result
    assert invocation.result["sent"] == 25
    assert invocation.result["request_id"].startswith(f"{request_id}:")
    if mode == "process":
        assert invocation.returncode == 0
    assert_sent_once_each(message, sandbox)
    assert not Recipient.objects.exclude(status="sent").exists()


# --- the Lambda runtime end to end, against a local Invoke endpoint -----------------------------


def test_the_lambda_runtime_invokes_real_workers_through_bench_lambda_local(
    api_url, sandbox, settings, monkeypatch
):
    # boto3 signs and sends a real Invoke (Event) to bench.lambda_local, which the benchmarks'
    # fleets use as Lambda: the worker it runs sends the message through the real API.
    port = free_port()
    env = {**LocalRuntime._child_env(), "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"}
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.lambda_local", "--port", str(port), "--timeout-s", "20"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "listening" in server.stdout.readline()
        monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "t")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "t")
        settings.WORKER_RUNTIME = "lambda"
        settings.LAMBDA_FUNCTION_NAME = FUNCTION
        settings.AWS_REGION = REGION
        customer = sandbox_customer(sandbox, batch_size=10)
        message = make_message(customer, 25)
        _, event = start_worker(customer, api_url)

        request_id = get_runtime().invoke(**event)

        assert request_id
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_lambda/stats") as answer:
                stats = json.loads(answer.read())
            if stats["finished"] + stats["failed"]:
                break
            time.sleep(0.2)
        assert stats == {"invocations": 1, "running": 0, "finished": 1, "failed": 0}
        assert_sent_once_each(message, sandbox)
        assert not Recipient.objects.exclude(status="sent").exists()
    finally:
        server.terminate()
        server.wait(10)
