"""AWS for tests: moto's own server on an ephemeral port (real HTTP, as boto3 talks to AWS).

    from tests.aws import moto_server  # noqa: F401  (a fixture)
"""

import pytest

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
    yield server
    server.stop()
