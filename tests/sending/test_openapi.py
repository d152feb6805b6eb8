"""The served OpenAPI description, checked against the real views served as production serves them
(uvicorn, emailops.asgi).

Schemathesis generates requests from sending/openapi.yaml (valid ones and, in its negative phase,
invalid ones) and checks every answer against the description: documented status codes, content
types and bodies, and no server errors.
"""

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from sending import checkin
from tests.factories import make_customer, make_message

SPEC = Path(__file__).resolve().parents[2] / "sending" / "openapi.yaml"
schema = schemathesis.openapi.from_path(SPEC)


@pytest.fixture
def worker_token(asgi_server):
    customer = make_customer("schema-u")
    make_message(customer, 50)
    _, token = checkin.worker_start(customer_id=customer.pk)
    return token


def test_the_served_description_is_the_one_in_the_repo(client):
    assert client.get("/api/worker/v1/openapi.yaml").content == SPEC.read_bytes()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_views_answer_as_described(case, asgi_server, worker_token):
    case.call_and_validate(
        base_url=f"{asgi_server.url}/api/worker/v1",
        headers={"Authorization": f"Bearer {worker_token}"},
    )
