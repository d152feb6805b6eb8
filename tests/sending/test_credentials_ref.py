"""Credentials by reference: the account names a Secrets Manager secret or SSM parameter, the
answer carries only that ARN, and the worker reads the credentials with boto3 (here moto's
server, over real HTTP), once per process."""

import json

import boto3
import pytest

from customers.models import ProviderAccount
from sending.models import Worker
from sending.providers import open_provider, references
from sending.worker import LocalContext, WorkerLoop
from tests.aws import moto_server  # noqa: F401 - a fixture
from tests.factories import API_KEY, CustomerFactory, make_message, start_worker

from .test_stored_answers import stored_answers_text

pytestmark = pytest.mark.usefixtures("moto_server")


@pytest.fixture(autouse=True)
def _nothing_resolved_yet():
    references.forget()
    yield
    references.forget()


def _secret(value: dict) -> str:
    client = boto3.client("secretsmanager", region_name="us-east-1")
    return client.create_secret(Name="emailops/sandbox", SecretString=json.dumps(value))["ARN"]


def _parameter(value: dict) -> str:
    client = boto3.client("ssm", region_name="eu-west-1")
    client.put_parameter(
        Name="/emailops/postmark", Value=json.dumps(value), Type="SecureString", Overwrite=True
    )
    return client.get_parameter(Name="/emailops/postmark")["Parameter"]["ARN"]


def test_a_worker_sends_with_credentials_it_reads_itself(
    api_url, sandbox, frozen_server_clock, caplog
):
    arn = _secret({"api_key": API_KEY})
    account = ProviderAccount.objects.create(
        name="By reference",
        kind="sandbox",
        settings={"api_url": sandbox.url},
        credentials_ref=arn,
        per_minute_cap=1_000,
    )
    customer = CustomerFactory(provider_account=account, per_minute=1_000)
    customer.send_limit.batch_size = 10
    customer.send_limit.save()
    message = make_message(customer, 15)
    _, event = start_worker(customer, api_url)
    loop = WorkerLoop(event, LocalContext(20))

    answer = loop.checkin()
    assert answer.batch["provider"]["credentials"] == {}
    assert answer.batch["provider"]["credentials_ref"] == arn
    loop.send_batch(answer.batch, answer.window)
    summary = loop.run()

    assert summary["sent"] == 15, summary
    assert message.recipients.filter(status="sent").count() == 15
    # The sandbox received the key the secret holds: the worker read it.
    assert {send.api_key for send in sandbox.sends} == {API_KEY}
    assert API_KEY not in stored_answers_text() + caplog.text
    assert Worker.objects.count() == 1


def test_an_ssm_parameter_is_read_once_per_process():
    arn = _parameter({"server_token": "pm-from-ssm"})
    config = {"kind": "postmark", "settings": {}, "credentials": {}, "credentials_ref": arn}

    assert open_provider(config).credentials == {"server_token": "pm-from-ssm"}
    # Changed at the source: a warm process keeps what it read (once per cold start).
    boto3.client("ssm", region_name="eu-west-1").put_parameter(
        Name="/emailops/postmark", Value='{"server_token": "rotated"}', Overwrite=True
    )
    assert open_provider(config).credentials == {"server_token": "pm-from-ssm"}
    references.forget()  # a cold start
    assert open_provider(config).credentials == {"server_token": "rotated"}


def test_a_reference_that_is_not_a_json_object_is_refused_without_its_value():
    client = boto3.client("secretsmanager", region_name="us-east-1")
    arn = client.create_secret(Name="plain", SecretString="hunter2-plain-text")["ARN"]
    with pytest.raises(references.UnreadableReference, match="JSON object") as caught:
        references.resolve(arn)
    assert "hunter2" not in str(caught.value)
    missing = arn.replace("plain", "missing")
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        references.resolve(missing)
