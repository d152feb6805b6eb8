"""Celery tasks: thin adapters that load by id, call a service, and decide what runs next."""

import logging
import uuid

from celery import shared_task

from . import alerts, conductor, scheduling

log = logging.getLogger(__name__)


@shared_task(acks_late=True, ignore_result=True)
def conduct(customer_id: int, holder: str | None = None) -> str:
    """One conductor tick for a customer; re-enqueues itself while the customer has work.

    Idempotent (a tick only reconciles state), so acks_late is safe: a tick redelivered after a
    crash runs again, or finds the lease held by the chain that replaced it and stops.
    """
    holder = holder or uuid.uuid4().hex
    if not conductor.acquire_lease(customer_id=customer_id, holder=holder):
        return "held by another conductor"
    report = conductor.tick(customer_id=customer_id)
    if not report.sending:
        conductor.release_lease(customer_id=customer_id, holder=holder)
        return "idle"
    conduct.apply_async((customer_id, holder), countdown=conductor.tick_seconds())
    return "ticked"


@shared_task(ignore_result=True)
def watchdog() -> dict:
    """Run by beat every few seconds: start scheduled messages that are due, and a conductor for
    every customer sending with none alive (a crashed chain is replaced once its lease expires).
    Messages due before its next run are handed to `start_scheduled` for their exact time."""
    started = scheduling.start_due_messages()
    orphans = conductor.customers_needing_a_conductor()
    alerts.conductors_silent(orphans)
    for customer_id in orphans:
        conduct.delay(customer_id)
    if started or orphans:
        log.info("watchdog: started messages %s, conductors for %s", started, orphans)
    return {"started": started, "conductors": orphans}


@shared_task(acks_late=True, ignore_result=True)
def start_scheduled(message_ids: list[int], expected_at: str) -> list[int]:
    """Start scheduled messages at their time (enqueued by the watchdog with that `eta`, seconds
    ahead). Idempotent: it starts only messages still scheduled for `expected_at` and due."""
    return scheduling.start_handed_over(message_ids, expected_at)
