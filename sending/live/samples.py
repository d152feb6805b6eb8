"""Live samples: the engine's rows a sample is read from, and the sample built from them.

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
"""

from __future__ import annotations

from django.conf import settings
from django.core.cache import cache
from django.db import connection

from customers.models import Customer, ProviderAccount, SendLimit

from .. import planner
from ..clock import datetime_to_ms, db_datetime, ms_to_datetime
from ..models import ConductorLease, CustomerMinute, Lease, Message, Recipient, Worker
from .presence import key

SECONDS_KEPT = 600  # per-second points kept in the cache: ten minutes
MESSAGE_STATS_TTL_S = 7 * 24 * 3600
MINUTE_COLUMNS = ("cap", "granted", "refunded", "carried_in", "sent", "failed", "throttled")


def window_ms() -> int:
    return int(settings.SEND_WINDOW_MS)


def _row_ms(value) -> int | None:
    """Epoch milliseconds of a datetime read by raw SQL (None stays None)."""
    return None if value is None else datetime_to_ms(db_datetime(value))


def read_rows(customer_id: int, now_ms: int) -> dict:
    """The engine's rows a sample is built from, in two statements."""
    return read_rows_many([customer_id], now_ms)[customer_id]


def _empty_rows(minute_ms: int) -> dict:
    return {
        "minute_ms": minute_ms,
        "minutes": {},
        "leases": {},
        "workers": (0, None, 0),
        "limits": None,
        "conductor": (None, ""),
        "messages": [],
    }


def read_rows_many(customer_ids: list[int], now_ms: int) -> dict[int, dict]:
    """`read_rows` for several customers at once, in the same two statements: a conductor round
    reads every customer it ticks together (a statement a customer was most of a round's time on
    a busy machine, docs/benchmarks.md)."""
    window = window_ms()
    minute_ms = now_ms - now_ms % window
    minutes = [minute_ms - window, minute_ms]
    adapt = connection.ops.adapt_datetimefield_value
    live_states = [s.value for s in Worker.LIVE_STATES]
    ids = sorted(set(customer_ids))
    if not ids:
        return {}
    some = ", ".join(["%s"] * len(ids))
    sql = f"""
        SELECT m.customer_id, 'minute', m.minute_start,
               {", ".join("m." + c for c in MINUTE_COLUMNS)}
        FROM {CustomerMinute._meta.db_table} m
        WHERE m.customer_id IN ({some}) AND m.minute_start IN (%s, %s)
        UNION ALL
        SELECT l.customer_id, 'lease', l.minute_start, COUNT(*), SUM(l.size),
               SUM(l.started_through), 0, 0, 0, 0
        FROM {Lease._meta.db_table} l
        WHERE l.customer_id IN ({some}) AND l.state = %s
        GROUP BY l.customer_id, l.minute_start
        UNION ALL
        SELECT w.customer_id, 'workers', NULL, COUNT(*), AVG(w.rate_per_s),
               SUM(CASE WHEN w.throttled_minute = %s THEN 1 ELSE 0 END), 0, 0, 0, 0
        FROM {Worker._meta.db_table} w
        WHERE w.customer_id IN ({some}) AND w.state IN ({", ".join(["%s"] * len(live_states))})
        GROUP BY w.customer_id
        UNION ALL
        SELECT s.customer_id, 'limits', NULL, s.per_minute, s.max_workers, s.concurrency,
               CASE WHEN s.paused THEN 1 ELSE 0 END, a.per_minute_cap, 0, 0
        FROM {SendLimit._meta.db_table} s
        JOIN {Customer._meta.db_table} c ON c.id = s.customer_id
        LEFT JOIN {ProviderAccount._meta.db_table} a ON a.id = c.provider_account_id
        WHERE s.customer_id IN ({some})
        UNION ALL
        SELECT k.customer_id, 'conductor:' || k.holder, k.heartbeat_at, 0, 0, 0, 0, 0, 0, 0
        FROM {ConductorLease._meta.db_table} k WHERE k.customer_id IN ({some})
    """  # noqa: S608 - table names and placeholders only
    params = [
        *ids,
        adapt(ms_to_datetime(minutes[0])),
        adapt(ms_to_datetime(minutes[1])),
        *ids,
        Lease.State.OPEN.value,
        adapt(ms_to_datetime(minute_ms)),
        *ids,
        *live_states,
        *ids,
        *ids,
    ]
    everyone = {customer_id: _empty_rows(minute_ms) for customer_id in ids}
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for customer_id, kind, at, *values in cursor.fetchall():
            rows = everyone[customer_id]
            if kind == "minute":
                rows["minutes"][_row_ms(at)] = dict(
                    zip(MINUTE_COLUMNS, map(int, values), strict=True)
                )
            elif kind == "lease":
                count, size, started = (int(v or 0) for v in values[:3])
                rows["leases"][_row_ms(at)] = {"open": count, "size": size, "started": started}
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
                rows["conductor"] = (_row_ms(at), kind.removeprefix("conductor:"))
        # Raw SQL too: the query compiler would cost more than the query (a tick runs often).
        cursor.execute(
            f"SELECT customer_id, id, subject, status, claim_after"  # noqa: S608
            f" FROM {Message._meta.db_table}"
            f" WHERE customer_id IN ({some}) AND status IN (%s, %s)"
            " ORDER BY customer_id, started_at, id",
            [*ids, Message.Status.SENDING.value, Message.Status.PAUSED.value],
        )
        for customer_id, i, subject, status, cursor_at in cursor.fetchall():
            everyone[customer_id]["messages"].append(
                {"id": i, "subject": subject, "status": status, "claim_after": cursor_at}
            )
    return everyone


def message_stats(
    message_ids: list[int], found: dict | None = None
) -> dict[int, tuple[int, int, int]]:
    """(total, first id, last id) of each message's recipients: counted once per message and
    kept (a message's recipients are fixed once it has left draft). `found`: cache entries
    already fetched with others (one round trip a tick)."""
    keys = {m: key("msg", m) for m in message_ids}
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
    values = {c: row.get(c, 0) for c in MINUTE_COLUMNS}
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
    window = window_ms()
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
