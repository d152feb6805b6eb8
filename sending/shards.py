"""The conductor fleet: customers in CONDUCTOR_SHARDS shards, one Celery chain per shard.

A customer's shard is ``customer_id % CONDUCTOR_SHARDS``. Each round of a shard's chain (one
Celery task, every CONDUCTOR_TICK_MS) finds the shard's customers that have something going on
(a message sending, a batch out, or a lease this chain still holds) in one statement, takes or
renews their ConductorLeases in two (each customer's lease stays the guarantee that one conductor
at a time runs it: a customer held by another chain is left alone), and ticks them together
(``conductor.tick_many``). A customer that is not sending is not read at all.

One chain per shard: a chain first takes the shard's key in the cache (an atomic add with the
conductor lease's lifetime, renewed each round). A second chain started for the same shard (a
kick while the chain runs) finds the key taken and ends at once; if the key were lost, two chains
would share the shard's customers, each customer still with one conductor. The shards' chains
spread over however many Celery worker processes (and machines) consume the queue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.db.models import F
from django.db.models.functions import Mod

from . import conductor
from .clock import Clock
from .models import ConductorLease, Lease, Message

log = logging.getLogger(__name__)


def shards() -> int:
    return max(1, int(settings.CONDUCTOR_SHARDS))


def shard_of(customer_id: int) -> int:
    return customer_id % shards()


def _key(shard: int) -> str:
    return f"conductor:shard:{shard}"


def take_shard(shard: int, holder: str) -> bool:
    """Take or renew the shard's key for `holder`; False if another chain has it."""
    timeout = max(1, round(conductor.lease_seconds()))
    if cache.add(_key(shard), holder, timeout):
        return True
    if cache.get(_key(shard)) == holder:
        cache.touch(_key(shard), timeout)
        return True
    return False


def release_shard(shard: int, holder: str) -> None:
    if cache.get(_key(shard)) == holder:
        cache.delete(_key(shard))


def active_customers(*, shard: int, holder: str) -> list[int]:
    """The shard's customers with a message sending or a batch out, and those `holder` still
    holds (they get one more tick, which sees them idle, publishes their last sample and lets
    them go). One statement."""
    sending = _in_shard(Message.objects.filter(status=Message.Status.SENDING), shard)
    out = _in_shard(Lease.objects.filter(state=Lease.State.OPEN), shard)
    held = ConductorLease.objects.filter(holder=holder).order_by()
    held = held.values_list("customer_id", flat=True)
    return sorted(set(sending.union(out, held)))


def _in_shard(queryset, shard: int):
    in_shard = queryset.alias(shard=Mod(F("customer_id"), shards())).filter(shard=shard)
    return in_shard.order_by().values_list("customer_id", flat=True)


def acquire_leases(*, customer_ids: list[int], holder: str, clock: Clock) -> list[int]:
    """Take or renew these customers' conductor leases for `holder` where free, expired or
    already its own: the set-based form of ``conductor.acquire_lease``. Returns those held."""
    if not customer_ids:
        return []
    ConductorLease.objects.bulk_create(
        [ConductorLease(customer_id=c) for c in customer_ids], ignore_conflicts=True
    )
    now = clock.now
    expires = now + timedelta(seconds=conductor.lease_seconds())
    adapt = connection.ops.adapt_datetimefield_value
    marks = ", ".join(["%s"] * len(customer_ids))
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {ConductorLease._meta.db_table}"  # noqa: S608 - table name, placeholders
            " SET holder = %s, expires_at = %s, heartbeat_at = %s"
            f" WHERE customer_id IN ({marks})"
            "  AND (holder = %s OR holder = '' OR expires_at IS NULL OR expires_at < %s)"
            " RETURNING customer_id",
            [holder, adapt(expires), adapt(now), *customer_ids, holder, adapt(now)],
        )
        return sorted(row[0] for row in cursor.fetchall())


def release_leases(*, customer_ids: list[int], holder: str) -> None:
    if customer_ids:
        ConductorLease.objects.filter(customer_id__in=customer_ids, holder=holder).update(
            holder="", expires_at=None
        )


@dataclass
class Round:
    shard: int
    held: list[int] = field(default_factory=list)
    sending: list[int] = field(default_factory=list)
    reports: dict[int, conductor.TickReport] = field(default_factory=dict)


def conduct_round(*, shard: int, holder: str, clock: Clock | None = None, runtime=None) -> Round:
    """One round of the shard's chain (its key held by `holder`)."""
    clock = clock or Clock.read()
    result = Round(shard=shard)
    active = active_customers(shard=shard, holder=holder)
    result.held = acquire_leases(customer_ids=active, holder=holder, clock=clock)
    result.reports = conductor.tick_many(customer_ids=result.held, clock=clock, runtime=runtime)
    result.sending = [c for c, report in result.reports.items() if report.sending]
    release_leases(
        customer_ids=[c for c in result.held if c not in set(result.sending)], holder=holder
    )
    return result
