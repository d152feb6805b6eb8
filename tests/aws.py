"""AWS for tests: moto's own server on an ephemeral port (real HTTP, as boto3 talks to AWS).

from tests.aws import moto_server  # noqa: F401  (a fixture)
"""

import pytest
import requests

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture
def moto_server(monkeypatch):
    """moto's server in a thread; boto3 in this process and in subprocesses given
    `moto_server.env` reaches it through AWS_ENDPOINT_URL. State is reset per test."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    server.url = url
    server.env = env
    # moto's backends live in this process: start from nothing, whatever a test before made.
    requests.post(f"{url}/moto-api/reset", timeout=10).raise_for_status()
    yield server
    requests.post(f"{url}/moto-api/reset", timeout=10)
    requests.post(f"{url}/moto-api/state-manager/unset-transition",
                  json={"model_name": "ecs::task"}, timeout=10)  # fmt: skip
    server.stop()
