"""Celery tasks: thin adapters that load by id, call a service, and decide what runs next."""

import logging
import time
import uuid

from celery import shared_task

from . import alerts, conductor, scheduling, shards

log = logging.getLogger(__name__)


@shared_task(acks_late=True, ignore_result=True)
def conduct(customer_id: int, holder: str | None = None) -> str:
    """A kick for one customer (a send started or resumed): its shard's chain runs a round now,
    or, if the shard already has a chain, that chain picks the customer up within a tick.

    `holder` is accepted and ignored: ticks enqueued by the per-customer chains before the
    shards (a deploy in the middle of a send) end here harmlessly.
    """
    return conduct_shard(shards.shard_of(customer_id))


@shared_task(acks_late=True, ignore_result=True)
def conduct_shard(shard: int, holder: str | None = None) -> str:
    """One round of a shard's conductor chain; re-enqueues itself while a customer of the shard
    is sending, one CONDUCTOR_TICK_MS after this round began.

    Idempotent (a round only reconciles state), so acks_late is safe: a round redelivered after
    a crash runs again, or finds the shard taken by the chain that replaced it and stops.
    """
    began = time.monotonic()
    holder = holder or uuid.uuid4().hex
    if not shards.take_shard(shard, holder):
        return "held by another chain"
    done = shards.conduct_round(shard=shard, holder=holder)
    if not done.sending:
        shards.release_shard(shard, holder)
        return "idle"
    countdown = max(0.0, conductor.tick_seconds() - (time.monotonic() - began))
    conduct_shard.apply_async((shard, holder), countdown=countdown)
    return "ticked"


@shared_task(ignore_result=True)
def watchdog() -> dict:
    """Run by beat every few seconds: start scheduled messages that are due, and a chain for
    every shard with a customer sending and no live conductor (a crashed chain is replaced once
    its leases expire). Messages due before its next run are handed to `start_scheduled` for
    their exact time (when SCHEDULE_HANDOVER is on)."""
    started = scheduling.start_due_messages()
    orphans = conductor.customers_needing_a_conductor()
    alerts.conductors_silent(orphans)
    kicked = sorted({shards.shard_of(c) for c in orphans})
    for shard in kicked:
        conduct_shard.delay(shard)
    if started or orphans:
        log.info("watchdog: started messages %s, conductors for %s", started, orphans)
    return {"started": started, "conductors": orphans, "shards": kicked}


@shared_task(acks_late=True, ignore_result=True)
def start_scheduled(message_ids: list[int], expected_at: str) -> list[int]:
    """Start scheduled messages at their time (enqueued by the watchdog with that `eta`, seconds
    ahead). Idempotent: it starts only messages still scheduled for `expected_at` and due."""
    return scheduling.start_handed_over(message_ids, expected_at)
