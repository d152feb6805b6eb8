"""Who watches: the presence keys the live consumers refresh, the channel-layer group and the
addresses inside it, and the cache key scheme every part of the live package shares."""

from __future__ import annotations

from django.core.cache import cache

# Every live page's consumer is in one channel-layer group, LIVE_GROUP: the publisher sends one
# batch at a time to it, each item addressed to a customer's page (`customer_group`) or to the
# overview (OVERVIEW_GROUP), and each consumer keeps the items addressed to it
# (docs/architecture.md, "How a sample travels from a check-in to a chart").
LIVE_GROUP = "live"
OVERVIEW_GROUP = "live-overview"
PRESENCE_TTL_S = 15  # a consumer refreshes its presence well within this


def customer_group(customer_id: int) -> str:
    return f"live-customer-{customer_id}"


def key(*parts) -> str:
    """A cache key of the live package: `live:<part>:<part>...`."""
    return "live:" + ":".join(str(p) for p in parts)


def watch_key(customer_id: int | None) -> str:
    """The presence key of a customer's page (None: the overview)."""
    return key("watched", customer_id or "overview")


def mark_watched(customer_id: int | None) -> None:
    """A consumer says someone watches this customer (None: the overview)."""
    cache.set(watch_key(customer_id), 1, PRESENCE_TTL_S)


def unmark_watched(customer_id: int | None) -> None:
    """Forget that someone watches (benches that compare watched and unwatched ticks)."""
    cache.delete(watch_key(customer_id))


def watched(customer_id: int | None) -> bool:
    return bool(cache.get(watch_key(customer_id)))
