"""Log lines carry the ids they are about (emailops/logs.py), and LOG_FORMAT=json writes one JSON
object a line."""

import io
import json
import logging

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from celery import signals
from django.utils.module_loading import import_string

from emailops.logs import current_ids, log_ids, logging_config
from sending.tasks import conduct


@pytest.fixture
def json_lines():
    """The console handler LOG_FORMAT=json configures (its formatter and filter, built from the
    same LOGGING dict), writing into a buffer."""
    config = logging_config(fmt="json", level="INFO", task_level="WARNING")
    spec = dict(config["formatters"]["json"])
    formatter = import_string(spec.pop("()"))(**spec)
    (filter_name,) = config["handlers"]["console"]["filters"]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(import_string(config["filters"][filter_name]["()"])())
    root = logging.getLogger()
    root.addHandler(handler)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)


def test_json_lines_carry_the_context_ids_and_extra_wins(json_lines):
    log = logging.getLogger("sending.conductor")
    with log_ids(customer_id=3, worker_id=None):
        log.info("customer %s: starting workers", 3)
        with log_ids(worker_id=7, lease_id=11):
            log.warning("lease done", extra={"lease_id": 12})
    log.info("outside")

    first, second, third = json_lines()
    assert first["message"] == "customer 3: starting workers"
    assert (first["level"], first["logger"], first["customer_id"]) == (
        "INFO",
        "sending.conductor",
        3,
    )
    assert "worker_id" not in first  # None leaves an id out
    assert (second["customer_id"], second["worker_id"], second["lease_id"]) == (3, 7, 12)
    assert "customer_id" not in third and "time" in third
    assert "color_message" not in third


def test_unknown_ids_are_refused():
    with pytest.raises(TypeError, match="log_ids takes"), log_ids(tenant=1):
        pass


def test_ids_reach_the_thread_the_worker_api_runs_its_service_in():
    def service():
        return current_ids()

    async def view():
        with log_ids(customer_id=4, worker_id=9):
            return await sync_to_async(service, thread_sensitive=False)()

    assert async_to_sync(view)() == {"customer_id": 4, "worker_id": 9}


def test_a_celery_task_logs_with_the_ids_among_its_arguments():
    # The signals Celery sends around each task body, in the thread that runs it.
    signals.task_prerun.send(sender=conduct, task_id="t-1", task=conduct, args=(42,), kwargs={})
    try:
        assert current_ids() == {"customer_id": 42}
    finally:
        signals.task_postrun.send(sender=conduct, task_id="t-1", task=conduct)
    assert current_ids() == {}


def test_log_format_must_be_plain_or_json():
    with pytest.raises(ValueError, match="LOG_FORMAT must be plain or json"):
        logging_config(fmt="xml", level="INFO", task_level="WARNING")
