"""Live samples: what the operators' pages draw, built from what the engine keeps.

A sample is read from the customer's rows in a few indexed statements — its send limit, its
conductor lease, the CustomerMinute rows of this minute and the last, its open leases grouped by
minute, its live workers, its sending messages — never by counting recipients.

Per-second throughput comes from the leases' progress marks (`Lease.started_through`), not from
the reports (`CustomerMinute.sent`): a worker moves its mark before each chunk of about a second
of sending, while `sent` moves only when a whole batch (up to a minute of sends) is reported, so
per-second differences of `sent` would be zeros with a spike per batch. The count of sends
started in a minute is `sent + failed` of its row (settled leases) plus the marks of its open
leases; the difference between two ticks is what was started in between. A mark is an upper
bound (a worker announces a chunk just before starting it), so a point may lead the sends by a
second; the per-minute bars are the ledger's `sent`, exactly.

The conductor is the only writer for its customer (one chain at a time holds the customer's
ConductorLease), so the per-customer state kept in the cache — the last counts, the per-second
points of the last ten minutes, the steadied rate — needs no lock. Per-minute history (24 hours
and more) is read from CustomerMinute rows when a page opens.

Publishing: after commit, at most one message every PUBLISH_EVERY_MS a customer, only while it is
sending, and only when someone watches — the consumers keep a presence key with a short TTL in
the cache, and the publisher checks it. Messages go out through one event loop per process (a
daemon thread), so channels_redis keeps one connection pool per process instead of one per
publish: `async_to_sync` would run each publish on a new event loop, and channels_redis keeps a
pool per loop until `close_pools()` is called.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction

from customers.models import Customer, ProviderAccount, SendLimit
from customers.services import STEERABLE_FIELDS

from . import planner
from .models import ConductorLease, CustomerMinute, Lease, Message, Recipient, Worker

log = logging.getLogger(__name__)

OVERVIEW_GROUP = "live-overview"
SECONDS_KEPT = 600  # per-second points kept in the cache: ten minutes
HISTORY_HOURS = 24  # per-minute history a page opens with
PRESENCE_TTL_S = 15  # a consumer refreshes its presence well within this
PUBLISH_EVERY_MS = 250  # at most 4 messages a second a customer
OVERVIEW_EVERY_MS = 1000  # the overview gets each customer's line at most once a second
STATE_TTL_S = SECONDS_KEPT + 60
MESSAGE_STATS_TTL_S = 7 * 24 * 3600


def customer_group(customer_id: int) -> str:
    return f"live-customer-{customer_id}"


def _key(*parts) -> str:
    return "live:" + ":".join(str(p) for p in parts)


# --- presence -------------------------------------------------------------------------------


def mark_watched(customer_id: int | None) -> None:
    """A consumer says someone watches this customer (None: the overview)."""
    cache.set(_key("watched", customer_id or "overview"), 1, PRESENCE_TTL_S)


def watched(customer_id: int | None) -> bool:
    return bool(cache.get(_key("watched", customer_id or "overview")))


# --- reading the engine's rows --------------------------------------------------------------


def _window_ms() -> int:
    return int(settings.SEND_WINDOW_MS)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _ms(value) -> int | None:
    """Epoch milliseconds of a datetime read by raw SQL (SQLite hands back naive UTC text)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = datetime.fromisoformat(value).replace(tzinfo=UTC)
    return round(value.timestamp() * 1000)


_MINUTE_COLUMNS = ("cap", "granted", "refunded", "carried_in", "sent", "failed", "throttled")


def read_rows(customer_id: int, now_ms: int) -> dict:
    """The engine's rows a sample is built from, in two statements."""
    window = _window_ms()
    minute_ms = now_ms - now_ms % window
    minutes = [minute_ms - window, minute_ms]
    adapt = connection.ops.adapt_datetimefield_value
    live_states = [s.value for s in Worker.LIVE_STATES]
    sql = f"""
        SELECT 'minute', m.minute_start, {", ".join("m." + c for c in _MINUTE_COLUMNS)}
        FROM {CustomerMinute._meta.db_table} m
        WHERE m.customer_id = %s AND m.minute_start IN (%s, %s)
        UNION ALL
        SELECT 'lease', l.minute_start, COUNT(*), SUM(l.size), SUM(l.started_through),
               0, 0, 0, 0
        FROM {Lease._meta.db_table} l
        WHERE l.customer_id = %s AND l.state = %s
        GROUP BY l.minute_start
        UNION ALL
        SELECT 'workers', NULL, COUNT(*), AVG(w.rate_per_s),
               SUM(CASE WHEN w.throttled_minute = %s THEN 1 ELSE 0 END), 0, 0, 0, 0
        FROM {Worker._meta.db_table} w
        WHERE w.customer_id = %s AND w.state IN ({", ".join(["%s"] * len(live_states))})
        UNION ALL
        SELECT 'limits', NULL, s.per_minute, s.max_workers, s.concurrency,
               CASE WHEN s.paused THEN 1 ELSE 0 END, a.per_minute_cap, 0, 0
        FROM {SendLimit._meta.db_table} s
        JOIN {Customer._meta.db_table} c ON c.id = s.customer_id
        LEFT JOIN {ProviderAccount._meta.db_table} a ON a.id = c.provider_account_id
        WHERE s.customer_id = %s
        UNION ALL
        SELECT 'conductor:' || k.holder, k.heartbeat_at, 0, 0, 0, 0, 0, 0, 0
        FROM {ConductorLease._meta.db_table} k WHERE k.customer_id = %s
    """  # noqa: S608 - table names and placeholders only
    params = [
        customer_id,
        adapt(_dt(minutes[0])),
        adapt(_dt(minutes[1])),
        customer_id,
        Lease.State.OPEN.value,
        adapt(_dt(minute_ms)),
        customer_id,
        *live_states,
        customer_id,
        customer_id,
    ]
    rows: dict[str, Any] = {
        "minute_ms": minute_ms,
        "minutes": {},
        "leases": {},
        "workers": (0, None, 0),
        "limits": None,
        "conductor": (None, ""),
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for kind, at, *values in cursor.fetchall():
            if kind == "minute":
                rows["minutes"][_ms(at)] = dict(zip(_MINUTE_COLUMNS, map(int, values), strict=True))
            elif kind == "lease":
                count, size, started = (int(v or 0) for v in values[:3])
                rows["leases"][_ms(at)] = {"open": count, "size": size, "started": started}
            elif kind == "workers":
                n, rate, throttled = values[:3]
                rows["workers"] = (
                    int(n),
                    float(rate) if rate is not None else None,
                    int(throttled or 0),
                )
            elif kind == "limits":
                per_minute, max_workers, concurrency, paused, account_cap = values[:5]
                rows["limits"] = {
                    "per_minute": int(per_minute),
                    "max_workers": int(max_workers),
                    "concurrency": int(concurrency),
                    "paused": bool(paused),
                    "account_cap": None if account_cap is None else int(account_cap),
                }
            elif kind.startswith("conductor:"):
                rows["conductor"] = (_ms(at), kind.removeprefix("conductor:"))
        # Raw SQL too: the query compiler would cost more than the query (a tick runs often).
        cursor.execute(
            f"SELECT id, subject, status, claim_after FROM {Message._meta.db_table}"  # noqa: S608
            " WHERE customer_id = %s AND status IN (%s, %s) ORDER BY started_at, id",
            [customer_id, Message.Status.SENDING.value, Message.Status.PAUSED.value],
        )
        rows["messages"] = [
            {"id": i, "subject": subject, "status": status, "claim_after": cursor_at}
            for i, subject, status, cursor_at in cursor.fetchall()
        ]
    return rows


def message_stats(
    message_ids: list[int], found: dict | None = None
) -> dict[int, tuple[int, int, int]]:
    """(total, first id, last id) of each message's recipients: counted once per message and
    kept (a message's recipients are fixed once it has left draft). `found`: cache entries
    already fetched with others (one round trip a tick)."""
    keys = {m: _key("msg", m) for m in message_ids}
    if found is None:
        found = cache.get_many(list(keys.values()))
    stats = {m: tuple(found[k]) for m, k in keys.items() if k in found}
    missing = [m for m in message_ids if m not in stats]
    if missing:
        from django.db.models import Count, Max, Min

        counted = {
            row["message_id"]: (row["n"], row["first"] or 0, row["last"] or 0)
            for row in Recipient.objects.filter(message_id__in=missing)
            .values("message_id")
            .annotate(n=Count("*"), first=Min("id"), last=Max("id"))
        }
        for m in missing:
            stats[m] = counted.get(m, (0, 0, 0))
        cache.set_many({keys[m]: list(stats[m]) for m in missing}, MESSAGE_STATS_TTL_S)
    return stats


def _claimed_estimate(total: int, first: int, last: int, cursor: int) -> int:
    """How many of a message's recipients were handed out, from its claim cursor: the share of
    its id range behind the cursor (exact when its ids are contiguous, as one import makes them)."""
    if total <= 0 or cursor < first:
        return 0
    if cursor >= last:
        return total
    return round(total * (cursor - first + 1) / (last - first + 1))


# --- building a sample ----------------------------------------------------------------------


def _started(rows: dict, minute_ms: int) -> int:
    """Sends started in a minute so far: the ledger's settled ones and the open leases' marks."""
    row = rows["minutes"].get(minute_ms) or {}
    lease = rows["leases"].get(minute_ms) or {}
    return row.get("sent", 0) + row.get("failed", 0) + lease.get("started", 0)


def _ledger(rows: dict, minute_ms: int, cap: int) -> dict:
    row = rows["minutes"].get(minute_ms) or {}
    lease = rows["leases"].get(minute_ms) or {}
    values = {c: row.get(c, 0) for c in _MINUTE_COLUMNS}
    if not row:
        values["cap"] = cap
    values["charged"] = values["granted"] - values["refunded"] + values["carried_in"]
    values["in_flight"] = lease.get("size", 0)
    values["t"] = minute_ms
    return values


def build(
    customer_id: int,
    now_ms: int,
    state: dict | None,
    *,
    rows: dict | None = None,
    cached: dict | None = None,
) -> tuple[dict, dict]:
    """A sample and the conductor's next state, from the engine's rows and the last state."""
    rows = rows or read_rows(customer_id, now_ms)
    state = dict(state or {})
    window = _window_ms()
    minute_ms = rows["minute_ms"]
    limits = rows["limits"] or {
        "per_minute": 0,
        "max_workers": 0,
        "concurrency": 0,
        "paused": False,
        "account_cap": None,
    }
    workers, _rate, throttled_workers = rows["workers"]

    # Sends started since the last tick, from the marks (see the module docstring).
    counts = {m: _started(rows, m) for m in (minute_ms - window, minute_ms)}
    last_counts = {int(k): v for k, v in (state.get("counts") or {}).items()}
    delta = 0
    if last_counts:
        for m, n in counts.items():
            delta += max(0, n - last_counts.get(m, 0))
    seconds = [list(p) for p in state.get("seconds") or []]
    second = now_ms // 1000
    if seconds and seconds[-1][0] == second:
        seconds[-1][1] += delta
        seconds[-1][2] = workers
        point = seconds[-1]
    else:
        # Seconds without a tick are left out rather than drawn as zero sends.
        point = [second, delta, workers]
        seconds.append(point)
    seconds = seconds[-SECONDS_KEPT:]

    # Throughput for the ETA: the last minute of points, steadied.
    recent = [p for p in seconds if p[0] > second - 60]
    span = (second - recent[0][0] + 1) if recent else 0
    measured = sum(p[1] for p in recent) / span if span else 0.0
    dt_s = (now_ms - state["t"]) / 1000 if state.get("t") else 0
    rate = planner.steady(state.get("rate"), measured, dt_s=dt_s)

    stats = message_stats([m["id"] for m in rows["messages"]], cached)
    claimed_before = {int(k): v for k, v in (state.get("claimed") or {}).items()}
    messages = []
    ahead = 0
    in_flight = sum(lease["size"] for lease in rows["leases"].values())
    for m in rows["messages"]:
        total, first, last = stats[m["id"]]
        # Monotone: a claim that rescans from the start moves the cursor back.
        claimed = max(
            claimed_before.get(m["id"], 0),
            _claimed_estimate(total, first, last, m["claim_after"]),
        )
        # Recipients out with workers are the oldest-started message's first.
        out = min(in_flight, claimed)
        in_flight -= out
        done = claimed - out
        remaining = total - claimed
        plan = planner.eta(
            remaining=remaining + out,
            ahead=ahead,
            per_minute=limits["per_minute"],
            account_cap=limits["account_cap"],
            paused=limits["paused"] or m["status"] == Message.Status.PAUSED,
            recent_per_s=rate,
            recent_seconds=span,
            window_s=window / 1000,
        )
        ahead += remaining + out
        messages.append(
            {
                "id": m["id"],
                "subject": m["subject"],
                "status": m["status"],
                "total": total,
                "done": done,
                "eta_s": plan.seconds,
            }
        )
        claimed_before[m["id"]] = claimed

    heartbeat_ms, holder = rows["conductor"]
    sample = {
        "customer": customer_id,
        "t": now_ms,
        "window_ms": window,
        "limits": limits,
        "minute": _ledger(rows, minute_ms, limits["per_minute"]),
        "previous": _ledger(rows, minute_ms - window, limits["per_minute"]),
        "point": point,
        "workers": workers,
        "throttled_workers": throttled_workers,
        "rate_per_s": round(rate, 2),
        "eta_s": max((m["eta_s"] or 0 for m in messages), default=0)
        if all(m["eta_s"] is not None for m in messages)
        else None,
        "messages": messages,
        "conductor": {"heartbeat": heartbeat_ms, "holder": holder},
    }
    state.update(
        {
            "t": now_ms,
            "counts": counts,
            "seconds": seconds,
            "rate": rate,
            "claimed": {m["id"]: claimed_before[m["id"]] for m in rows["messages"]},
        }
    )
    return sample, state


def overview_line(sample: dict) -> dict:
    """What the overview shows of a customer: a compact line built from its sample."""
    limits = sample["limits"]
    previous = sample["previous"]
    cap = previous["cap"] or limits["per_minute"]
    return {
        "customer": sample["customer"],
        "t": sample["t"],
        "point": sample["point"],
        "workers": sample["workers"],
        "max_workers": limits["max_workers"],
        "per_minute": limits["per_minute"],
        "paused": limits["paused"],
        "utilization": round(previous["sent"] / cap, 4) if cap else None,
        "rate_per_s": sample["rate_per_s"],
        "eta_s": sample["eta_s"],
        "throttled": sample["minute"]["throttled"] + previous["throttled"],
        "minute": {k: sample["minute"][k] for k in ("t", "sent", "cap")},
        "alerts": sample.get("alerts", []),
    }


# --- the conductor's step -------------------------------------------------------------------


def on_tick(*, customer_id: int, now_ms: int, sending: bool, lost: int = 0) -> dict | None:
    """Called by each conductor tick: record the customer's per-second point, check its alerts
    and publish a sample if someone watches. Returns the sample (None when idle)."""
    from . import alerts

    state_key = _key("state", customer_id)
    if not sending:
        if cache.get(state_key) is not None:
            # One last sample, so that open pages see the send end.
            cache.delete(state_key)
            _publish_final(customer_id, now_ms)
        return None
    # Two statements and two cache round trips a tick: the rows, then everything the cache
    # holds for them at once (the state, who watches, the messages' sizes), then the writes.
    rows = read_rows(customer_id, now_ms)
    watch_keys = (_key("watched", customer_id), _key("watched", "overview"))
    cached = cache.get_many(
        [state_key, *watch_keys, *(_key("msg", m["id"]) for m in rows["messages"])]
    )
    sample, state = build(customer_id, now_ms, cached.get(state_key), rows=rows, cached=cached)
    sample["alerts"] = alerts.check(sample, lost=lost)
    last_published = state.get("published", 0)
    last_overview = state.get("overview", 0)
    outgoing = []
    if now_ms - last_published >= PUBLISH_EVERY_MS and cached.get(watch_keys[0]):
        outgoing.append((customer_group(customer_id), {"type": "live.sample", "sample": sample}))
        state["published"] = now_ms
    if now_ms - last_overview >= OVERVIEW_EVERY_MS and cached.get(watch_keys[1]):
        line = overview_line(sample)
        outgoing.append((OVERVIEW_GROUP, {"type": "live.line", "line": line}))
        state["overview"] = now_ms
    cache.set_many({state_key: state, _key("last", customer_id): sample}, STATE_TTL_S)
    if outgoing:
        transaction.on_commit(lambda: publish(outgoing))
    return sample


def _publish_final(customer_id: int, now_ms: int) -> None:
    cache.delete(_key("last", customer_id))
    outgoing = [
        (group, {"type": "live.idle", "customer": customer_id, "t": now_ms})
        for group, who in ((customer_group(customer_id), customer_id), (OVERVIEW_GROUP, None))
        if watched(who)
    ]
    if outgoing:
        transaction.on_commit(lambda: publish(outgoing))


def publish_annotation(*, customer_id: int, annotation: dict) -> None:
    """A change of limits, drawn on the customer's charts (after commit). Pages opened later
    read the same from the send limit's history (`limit_changes`)."""
    if watched(customer_id):
        message = {"type": "live.annotation", "annotation": annotation}
        transaction.on_commit(lambda: publish([(customer_group(customer_id), message)]))


# --- publishing -----------------------------------------------------------------------------

_loop: asyncio.AbstractEventLoop | None = None
_layer = None
_loop_lock = threading.Lock()
_consumer_loop: asyncio.AbstractEventLoop | None = None


def register_consumer_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The in-memory channel layer's queues belong to the loop its consumers run on: publish
    there (the embedded mode's one process), not on a loop of our own."""
    global _consumer_loop
    _consumer_loop = loop


def _publisher():
    """The layer and the event loop to publish on, or (None, None)."""
    from channels.layers import DEFAULT_CHANNEL_LAYER, InMemoryChannelLayer, channel_layers

    shared = get_channel_layer()
    if shared is None:
        return None, None
    if isinstance(shared, InMemoryChannelLayer):
        loop = _consumer_loop
        return (shared, loop) if loop is not None and loop.is_running() else (None, None)
    global _loop, _layer
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            # A layer instance of its own: close_pools() closes the pools of every loop an
            # instance has served, and the web process's consumers use the shared one.
            _layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="live-publisher", daemon=True).start()
        return _layer, _loop


async def _send_all(layer, outgoing) -> None:
    for group, message in outgoing:
        await layer.group_send(group, message)


def publish(outgoing: list[tuple[str, dict]], *, wait_s: float | None = None) -> bool:
    """Send (group, message) pairs through the channel layer; best effort: a channel-layer
    outage must not stop sending. With `wait_s`, wait for them to be sent (tests, benches)."""
    layer, loop = _publisher()
    if layer is None:
        return False
    future = asyncio.run_coroutine_threadsafe(_send_all(layer, outgoing), loop)

    def done(f):
        if f.exception() is not None:
            log.warning("could not publish a live sample: %s", f.exception())

    future.add_done_callback(done)
    if wait_s is not None:
        future.result(wait_s)
    return True


def close_publisher(timeout_s: float = 5) -> None:
    """Close the publisher's connection pool and stop its loop (process shutdown, tests)."""
    global _loop, _layer
    with _loop_lock:
        loop, layer, _loop, _layer = _loop, _layer, None, None
    if loop is None:
        return
    close = getattr(layer, "close_pools", None)
    if close is not None:
        asyncio.run_coroutine_threadsafe(close(), loop).result(timeout_s)
    loop.call_soon_threadsafe(loop.stop)


# --- what a page opens with -----------------------------------------------------------------


def history(customer_id: int, now_ms: int, *, hours: int = HISTORY_HOURS) -> list[dict]:
    """Per-minute rows of the last `hours`, oldest first, straight from the ledger."""
    since = _dt(now_ms - now_ms % _window_ms()) - timedelta(hours=hours)
    rows = CustomerMinute.objects.filter(customer_id=customer_id, minute_start__gte=since).order_by(
        "minute_start"
    )
    return [
        {
            "t": _ms(row.minute_start),
            **{c: getattr(row, c) for c in _MINUTE_COLUMNS},
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
                        "t": _ms(record.history_date),
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
    state = cache.get(_key("state", customer_id)) or {}
    last = cache.get(_key("last", customer_id))
    if last is None:
        last, _ = build(customer_id, now_ms, state)
        last["alerts"] = []
    return {
        "customer": customer_id,
        "t": now_ms,
        "window_ms": _window_ms(),
        "minutes": history(customer_id, now_ms),
        "seconds": [
            p for p in state.get("seconds") or [] if p[0] * 1000 > now_ms - SECONDS_KEPT * 1000
        ],
        "sample": last,
        "annotations": limit_changes(
            customer_id, since=_dt(now_ms) - timedelta(hours=HISTORY_HOURS)
        ),
        "sending": bool(state),
    }


def last_samples(customer_ids: list[int]) -> dict[int, dict]:
    keys = {c: _key("last", c) for c in customer_ids}
    found = cache.get_many(list(keys.values()))
    return {c: found[k] for c, k in keys.items() if k in found}
