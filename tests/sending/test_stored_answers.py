"""Secrets at rest: a worker's stored answer never keeps the provider block (its credentials),
nor does any log line of a real check-in; a replay reads the account again; the data migration
scrubs answers stored before."""

import importlib
import json
import logging

from django.db import connection

from customers.models import ProviderAccount
from sending import checkin
from sending.models import Worker
from sending.worker import LocalContext, WorkerLoop
from tests.factories import (
    API_KEY,
    T0,
    WorkerFactory,
    call,
    make_customer,
    make_message,
    sandbox_customer,
    start_worker,
)


def stored_answers_text() -> str:
    """Every worker row's stored answer, as the database holds it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT last_response FROM sending_worker")
        return " ".join(str(row[0]) for row in cursor.fetchall())


def test_a_real_send_stores_and_logs_no_credential(api_url, sandbox, frozen_server_clock, caplog):
    customer = sandbox_customer(sandbox, batch_size=10)
    message = make_message(customer, 25)
    worker, event = start_worker(customer, api_url)
    caplog.set_level(logging.DEBUG)
    loop = WorkerLoop(event, LocalContext(20))

    answer = loop.checkin()  # over HTTP, to the API uvicorn serves
    assert answer.decision == "send"
    assert answer.batch["provider"]["credentials"] == {"api_key": API_KEY}
    assert API_KEY not in stored_answers_text()  # the answer to this seq, as stored
    loop.send_batch(answer.batch, answer.window)
    summary = loop.run()

    assert summary["stop"] == "done", summary
    assert message.recipients.filter(status="sent").count() == 25
    assert Worker.objects.get(pk=worker.pk).last_seq >= 3
    assert API_KEY not in stored_answers_text()
    # The worker, the API (in this process) and the provider logged; none of it carries the key.
    assert caplog.records
    assert API_KEY not in caplog.text
    assert all(API_KEY not in str(r.args) for r in caplog.records)


def test_a_send_answer_is_stored_without_its_provider_and_replayed_with_it(db):
    customer = make_customer()
    customer.provider_account = ProviderAccount.objects.create(
        name="p", kind="postmark", per_minute_cap=1_000, credentials={"api_key": "pm-SECRET-1"}
    )
    customer.save()
    make_message(customer, 20)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    assert first["batch"]["provider"]["credentials"] == {"api_key": "pm-SECRET-1"}
    worker.refresh_from_db()
    assert worker.last_response["batch"]["provider"] is None
    assert "pm-SECRET-1" not in json.dumps(worker.last_response)

    # The same seq again (the answer was lost): whole again, with the account as it is now.
    ProviderAccount.objects.filter(pk=customer.provider_account_id).update(
        credentials={"api_key": "pm-SECRET-2"}
    )
    again = call(worker, first["token"], 1, at=T0 + 50)
    assert again["batch"]["provider"]["credentials"] == {"api_key": "pm-SECRET-2"}
    assert again["batch"]["recipients"] == first["batch"]["recipients"]


def test_the_migration_scrubs_answers_stored_before(db):
    old = WorkerFactory()  # an answer as stored before: provider block and credentials
    stop = WorkerFactory(last_response={"decision": "stop", "reason": "done"})
    empty = WorkerFactory(last_response=None)
    assert "SECRET-KEY" in stored_answers_text()
    migration = importlib.import_module("sending.migrations.0006_scrub_stored_credentials")

    with connection.schema_editor() as editor:
        migration.scrub(None, editor)

    assert "SECRET-KEY" not in stored_answers_text()
    old.refresh_from_db()
    assert old.last_response == {"decision": "send", "batch": {"lease_id": 1, "provider": None}}
    stop.refresh_from_db()
    empty.refresh_from_db()
    assert (stop.last_response, empty.last_response) == (
        {"decision": "stop", "reason": "done"},
        None,
    )
