"""What a live page opens with: the per-minute history from the ledger, the send limit's
changes as annotations, and the last samples kept in the cache."""

from __future__ import annotations

from datetime import timedelta

from django.core.cache import cache

from customers.models import SendLimit
from customers.services import STEERABLE_FIELDS

from ..clock import datetime_to_ms, ms_to_datetime
from ..models import CustomerMinute
from .presence import key
from .samples import MINUTE_COLUMNS, SECONDS_KEPT, build, window_ms

HISTORY_HOURS = 24  # per-minute history a page opens with


def history(customer_id: int, now_ms: int, *, hours: int = HISTORY_HOURS) -> list[dict]:
    """Per-minute rows of the last `hours`, oldest first, straight from the ledger."""
    since = ms_to_datetime(now_ms - now_ms % window_ms()) - timedelta(hours=hours)
    rows = CustomerMinute.objects.filter(customer_id=customer_id, minute_start__gte=since).order_by(
        "minute_start"
    )
    return [
        {
            "t": datetime_to_ms(row.minute_start),
            **{c: getattr(row, c) for c in MINUTE_COLUMNS},
            "charged": row.charged,
        }
        for row in rows
    ]


def limit_changes(customer_id: int, *, since) -> list[dict]:
    """The send limit's recorded changes since `since`: the charts' annotations."""
    records = list(
        SendLimit.history.filter(customer_id=customer_id, history_date__gte=since)
        .select_related("history_user")
        .order_by("history_date", "history_id")
    )
    notes = []
    previous = None
    for record in records:
        if previous is not None:
            delta = record.diff_against(previous, included_fields=STEERABLE_FIELDS)
            if delta.changes:
                notes.append(
                    {
                        "t": datetime_to_ms(record.history_date),
                        "who": record.history_user.get_username() if record.history_user else "",
                        "text": ", ".join(
                            f"{c.field.replace('_', ' ')} {c.old} → {c.new}" for c in delta.changes
                        ),
                    }
                )
        previous = record
    return notes


def snapshot(customer_id: int, now_ms: int) -> dict:
    """Everything a customer's live page draws: per-minute history from the ledger, the
    per-second points of the last ten minutes from the cache, the last sample, annotations."""
    state = cache.get(key("state", customer_id)) or {}
    last = cache.get(key("last", customer_id))
    if last is None:
        last, _ = build(customer_id, now_ms, state)
        last["alerts"] = []
    return {
        "customer": customer_id,
        "t": now_ms,
        "window_ms": window_ms(),
        "minutes": history(customer_id, now_ms),
        "seconds": [
            p for p in state.get("seconds") or [] if p[0] * 1000 > now_ms - SECONDS_KEPT * 1000
        ],
        "sample": last,
        "annotations": limit_changes(
            customer_id, since=ms_to_datetime(now_ms) - timedelta(hours=HISTORY_HOURS)
        ),
        "sending": bool(state),
    }


def last_samples(customer_ids: list[int]) -> dict[int, dict]:
    keys = {c: key("last", c) for c in customer_ids}
    found = cache.get_many(list(keys.values()))
    return {c: found[k] for c, k in keys.items() if k in found}
