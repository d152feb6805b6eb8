"""Live pages under load: ``python -m bench.live`` (PostgreSQL + Redis; not part of CI).

A fleet of customers sends at once through the production topology (``bench.harness``: uvicorn,
a Celery worker with thread-mode local workers, Celery beat, Redis, PostgreSQL, the sandbox),
10 customers and then 100, each with one browser-like websocket client on its live page and one
on the overview (the websocket clients send the session cookie and the Origin a browser sends).

Measured
--------
- ``latency_p50_ms`` / ``latency_p95_ms``: from a send being recorded to a sample showing it at
  the client. "Recorded" is the moment PostgreSQL updates the customer's CustomerMinute.sent (a
  trigger installed for the bench records ``clock_timestamp()`` of each update; its transaction
  commits a little later, so this errs long); "showing it" is the first sample received whose
  minute (or previous minute) has at least that ``sent``. Same machine, same clock.
- ``delivery_p50_ms`` / ``delivery_p95_ms``: from the tick that built a sample (its ``t``) to
  its arrival at the page: the part of the latency spent in the channel layer and the web
  process.
- ``layer_delivery_p50_ms`` / ``layer_delivery_p95_ms``: the same, to a listener on the live
  group in the bench's own process: the publisher's and the channel layer's part of delivery
  (what comes after it is the web process's).
- ``messages_per_s_per_customer``: websocket messages each watched customer's page received
  per second (the conductor publishes at most 4 a second a customer), and
  ``unwatched_messages_per_s_per_customer``: messages the publisher addressed to the pages of
  customers nobody watches (items of its batches), counted by a listener that keeps no presence
  (should be 0).
- ``overview_messages_per_s`` / ``overview_lines_per_s``: websocket messages the overview
  received a second, and the customers' lines in them (a batch's lines come in one message).
- ``client_loop_lag_p95_ms``: how late the websocket clients' own event loop wakes from a
  100 ms sleep (p95): a client too busy to read would add its own delay to every arrival;
  ``bytes_per_message``: the mean size of what the pages received.
- ``sample_cost_ms``: wall time of the conductor's live step (``sending.live.on_tick``: read the
  rows, record the point, publish) per customer-tick, for customers whose message has 100,000
  recipients, measured while the 100-customer fleet sends; ``baseline_sample_cost_ms``: today's
  sample before this work (a GROUP BY over every recipient of the customer's active messages,
  ``baseline_sample`` below) on the same customers, interleaved with it. Both are timed after
  the latency window (the fleet still sending, its pages closed): the baseline's GROUP BYs, six
  a second at 85 to 126 ms each (medians measured), are a load production no longer has.
- ``sample_cost_in_round_ms``: the live step as a conductor round takes it (``on_ticks``, every
  probe customer together), per customer.
- ``tick_cpu_ms``: CPU of a whole conductor tick (``sending.conductor.tick``, this process's
  thread plus the publisher thread) for those customers, with and without someone watching.

Last line: one JSON object with those keys (the figures at 100 customers), ``by_customers``
(the same at 10 and at 100), the settings and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import statistics
import sys
import threading
import time

from bench.harness import (
    Fleet,
    FleetSpec,
    configure_environment,
    flush_redis,
    insert_recipients,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/emailops_live"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/4"
PROBES = 3
PROBE_RECIPIENTS = 100_000
PROBE_SENT = 20_000
UNWATCHED_S = 20.0
PROBE_HOLDER = "bench-live"


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


# --- the baseline: the sample as the conductor built it before -------------------------------


def baseline_sample(*, customer_id: int, now_ms: int) -> dict:
    """The conductor's sample before the live pages: this minute's row, live workers, and a
    count of every recipient of the customer's sending and paused messages, by status."""
    from django.conf import settings
    from django.db.models import Count

    from customers.models import SendLimit
    from sending import pacing
    from sending.clock import ms_to_datetime
    from sending.models import CustomerMinute, Message, Recipient, Worker

    send_limit = SendLimit.objects.get(customer_id=customer_id)
    minute_ms = pacing.minute_start(now_ms, settings.SEND_WINDOW_MS)
    row = CustomerMinute.objects.filter(
        customer_id=customer_id, minute_start=ms_to_datetime(minute_ms)
    ).first()
    workers = Worker.objects.filter(customer_id=customer_id, state__in=Worker.LIVE_STATES).count()
    counts = dict(
        Recipient.objects.filter(
            message__customer_id=customer_id,
            message__status__in=[Message.Status.SENDING, Message.Status.PAUSED],
        )
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    total = sum(counts.values())
    done = sum(n for status, n in counts.items() if status in Recipient.TERMINAL_STATUSES)
    return {
        "cap": send_limit.per_minute,
        "sent": row.sent if row else 0,
        "workers": workers,
        "total": total,
        "done": done,
    }


# --- when a send is recorded: a trigger on the ledger ----------------------------------------

TRIGGER_SQL = """
CREATE TABLE IF NOT EXISTS bench_live_events (
    customer_id bigint, minute_start timestamptz, sent integer, at timestamptz);
CREATE OR REPLACE FUNCTION bench_live_record() RETURNS trigger AS $$
BEGIN
    IF NEW.sent <> OLD.sent THEN
        INSERT INTO bench_live_events VALUES
            (NEW.customer_id, NEW.minute_start, NEW.sent, clock_timestamp());
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS bench_live_sent ON sending_customerminute;
CREATE TRIGGER bench_live_sent AFTER UPDATE ON sending_customerminute
    FOR EACH ROW EXECUTE FUNCTION bench_live_record();
TRUNCATE bench_live_events;
CREATE TABLE IF NOT EXISTS bench_live_ticks (customer_id bigint, at timestamptz);
CREATE OR REPLACE FUNCTION bench_live_tick() RETURNS trigger AS $$
BEGIN
    INSERT INTO bench_live_ticks VALUES (NEW.customer_id, clock_timestamp());
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS bench_live_tick ON sending_conductorlease;
CREATE TRIGGER bench_live_tick AFTER UPDATE OF heartbeat_at ON sending_conductorlease
    FOR EACH ROW EXECUTE FUNCTION bench_live_tick();
TRUNCATE bench_live_ticks;
"""
DROP_SQL = """
DROP TRIGGER IF EXISTS bench_live_sent ON sending_customerminute;
DROP FUNCTION IF EXISTS bench_live_record();
DROP TABLE IF EXISTS bench_live_events;
DROP TRIGGER IF EXISTS bench_live_tick ON sending_conductorlease;
DROP FUNCTION IF EXISTS bench_live_tick();
DROP TABLE IF EXISTS bench_live_ticks;
"""


def _sql(script: str) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(script)


def recorded_events(customer_ids: list[int], since: float, until: float) -> list[tuple]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT customer_id, extract(epoch FROM minute_start) * 1000, sent,"
            " extract(epoch FROM at) FROM bench_live_events"
            " WHERE customer_id = ANY(%s) AND at >= to_timestamp(%s) AND at <= to_timestamp(%s)",
            [customer_ids, since, until],
        )
        return [(c, round(float(m)), s, float(at)) for c, m, s, at in cursor.fetchall()]


def ticks_per_customer(customer_ids: list[int], since: float, until: float) -> float:
    """How often the fleet's conductors ticked: from the heartbeats each tick writes, counted by
    a trigger like the ledger's (see TRIGGER_SQL)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM bench_live_ticks WHERE customer_id = ANY(%s)"
            " AND at >= to_timestamp(%s) AND at <= to_timestamp(%s)",
            [customer_ids, since, until],
        )
        return cursor.fetchone()[0] / len(customer_ids) / (until - since)


# --- browser-like websocket clients ----------------------------------------------------------


class Watchers:
    """One websocket client per customer page and one on the overview, in a thread's loop."""

    def __init__(self, web_url: str, cookie: str, customer_ids: list[int]):
        self.ws_url = web_url.replace("http://", "ws://")
        self.origin = web_url
        self.cookie = cookie
        self.customer_ids = customer_ids
        self.received: dict[int | None, list[tuple[float, dict]]] = {c: [] for c in customer_ids}
        self.received[None] = []
        self.connected = 0
        self.refused: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._tasks: list[asyncio.Future] = []
        self._sockets: list = []
        # How late the clients' loop wakes from a 100 ms sleep: a busy client would add its own
        # delay to every arrival it records.
        self.loop_lag_ms: list[tuple[float, float]] = []
        self._lag_task = None
        self.bytes_received = 0

    def start(self, timeout_s: float = 60) -> None:
        self._thread.start()
        self._lag_task = asyncio.run_coroutine_threadsafe(self._lag(), self._loop)
        paths = [(c, f"/ws/live/customer/{c}/") for c in self.customer_ids]
        paths.append((None, "/ws/live/overview/"))
        for key, path in paths:
            self._tasks.append(
                asyncio.run_coroutine_threadsafe(self._client(key, path), self._loop)
            )
        deadline = time.monotonic() + timeout_s
        while self.connected < len(paths) and time.monotonic() < deadline:
            if self.refused:
                raise RuntimeError(f"websockets refused: {self.refused[:3]}")
            time.sleep(0.1)
        if self.connected < len(paths):
            raise RuntimeError(f"only {self.connected} of {len(paths)} websockets connected")

    async def _lag(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.1)
            self.loop_lag_ms.append((time.time(), (time.monotonic() - before - 0.1) * 1000))

    async def _client(self, key, path: str) -> None:
        from websockets.asyncio.client import connect

        headers = {"Cookie": self.cookie, "Origin": self.origin}
        try:
            async with connect(
                self.ws_url + path, additional_headers=headers, max_size=2**24
            ) as ws:
                self._sockets.append(ws)
                first = True
                async for raw in ws:
                    now = time.time()
                    if first:
                        self.connected += 1
                        first = False
                    self.received[key].append((now, json.loads(raw)))
                    self.bytes_received += len(raw)
        except Exception as exc:
            self.refused.append(f"{path}: {exc}")

    def stop(self) -> None:
        """Close every socket with a closing handshake, so the server's consumers end (and stop
        keeping their presence) at once, as a browser closing its tabs."""

        async def close_all():
            await asyncio.gather(*(ws.close() for ws in self._sockets), return_exceptions=True)

        if self._lag_task is not None:
            self._lag_task.cancel()
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(30)
            for task in self._tasks:
                task.cancel()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


def session_cookie() -> tuple[str, int]:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    user = get_user_model().objects.create_superuser(
        username=f"bench-live-{os.getpid()}-{time.time_ns()}", password=None
    )
    client = Client()
    client.force_login(user)
    return (
        f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}",
        user.pk,
    )


def latencies(watchers: Watchers, events: list[tuple]) -> tuple[list[float], int]:
    """For each recorded send: the first sample at its customer's page that shows it."""
    samples: dict[int, list[tuple[float, int, int, int, int]]] = {}
    for customer_id in watchers.customer_ids:
        rows = []
        for at, message in watchers.received[customer_id]:
            sample = message.get("sample") if message.get("type") == "sample" else None
            if message.get("type") == "snapshot":
                sample = message["snapshot"].get("sample")
            if sample:
                rows.append(
                    (at, sample["minute"]["t"], sample["minute"]["sent"],
                     sample["previous"]["t"], sample["previous"]["sent"])
                )  # fmt: skip
        samples[customer_id] = rows
    found, missed = [], 0
    for customer_id, minute_ms, sent, at in events:
        shown = next(
            (
                t
                for t, m_t, m_sent, p_t, p_sent in samples.get(customer_id, [])
                if t >= at
                and ((m_t == minute_ms and m_sent >= sent) or (p_t == minute_ms and p_sent >= sent))
            ),
            None,
        )
        if shown is None:
            missed += 1
        else:
            found.append((shown - at) * 1000)
    return found, missed


def delivery_ms(watchers: Watchers, since: float, until: float) -> list[float]:
    """For each sample a page received: from the tick that built it (the sample's `t`) to its
    arrival. Splits the latency above into the sample's way through the channel layer and the
    web process, and what came before it (a tick late or not yet run)."""
    return [
        at * 1000 - message["sample"]["t"]
        for customer_id in watchers.customer_ids
        for at, message in watchers.received[customer_id]
        if message.get("type") == "sample" and since <= at <= until
    ]


class LayerListener:
    """A listener on the live group in a thread of its own, keeping no presence: where each item
    of a batch was addressed, and for each sample, from its tick (the sample's `t`) to the batch
    reaching this process. What `delivery_ms` adds on top of it is the web process's part."""

    def __init__(self) -> None:
        from channels.layers import channel_layers

        self.layer = channel_layers.make_backend("default")
        self.arrivals: list[tuple[float, float]] = []  # (arrival, arrival - tick) in s, ms
        self.addresses: list[str] = []  # every item's address, in arrival order
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._channel: str | None = None
        self._done: concurrent.futures.Future | None = None

    def start(self) -> None:
        self._thread.start()
        ready = threading.Event()
        self._done = asyncio.run_coroutine_threadsafe(self._listen(ready), self._loop)
        if not ready.wait(10):
            raise RuntimeError("the layer listener did not join the live group")

    async def _listen(self, ready: threading.Event) -> None:
        from sending import live

        self._channel = await self.layer.new_channel()
        await self.layer.group_add(live.LIVE_GROUP, self._channel)
        ready.set()
        while (message := await self.layer.receive(self._channel))["type"] != "bench.stop":
            now = time.time()
            for address, item in message.get("items", ()):
                self.addresses.append(address)
                if item.get("type") == "live.sample":
                    self.arrivals.append((now, now * 1000 - item["sample"]["t"]))
        await self.layer.group_discard(live.LIVE_GROUP, self._channel)
        await self.layer.close_pools()

    def stop(self) -> None:
        # A message of our own ends the receive loop (cancelling a receive in flight leaves
        # channels_redis's connection in a bad state).
        asyncio.run_coroutine_threadsafe(
            self.layer.send(self._channel, {"type": "bench.stop"}), self._loop
        ).result(10)
        self._done.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def delivery_ms(self, since: float, until: float) -> list[float]:
        return [ms for at, ms in self.arrivals if since <= at <= until]


# --- the cost of a sample and of a tick -------------------------------------------------------


def make_probes(fleet: Fleet, n: int, recipients: int, sent: int) -> list[int]:
    """Customers whose one message has `recipients` recipients, `sent` of them sent, sending
    but paused at the customer (no workers): ticks read them, nothing sends them."""
    from datetime import timedelta

    from django.db import connection
    from django.utils import timezone

    from customers.models import Customer, SendLimit
    from sending.models import ConductorLease, Message

    ids = []
    for i in range(n):
        slug = f"{fleet.prefix}probe-{i}"
        customer = Customer.objects.create(
            name=f"Probe {i}", slug=slug, default_from_email=f"news@{slug}.example"
        )
        SendLimit.objects.create(customer=customer, per_minute=6_000, paused=True)
        message = Message.objects.create(
            customer=customer, subject="Probe", text_body="x", status=Message.Status.SENDING
        )
        insert_recipients(connection, message.pk, recipients, sent=sent)
        # Held by the bench's own chain from the start: beat's watchdog must not give them a
        # Celery chain (which would then keep the lease and tick them itself).
        ConductorLease.objects.create(
            customer=customer, holder=PROBE_HOLDER, expires_at=timezone.now() + timedelta(hours=1)
        )
        ids.append(customer.pk)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sending_recipient")
    return ids


def _thread_cpu_s(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProbeTicker(threading.Thread):
    """Conductor chains for the probe customers, in this process: each round takes the lease
    and ticks every probe (so no Celery chain runs them), timing the whole tick's CPU with and
    without a watcher, and once `timing` is set, the live step and the baseline sample
    alternately. The baseline's GROUP BY over 100,000 recipients is not what production runs
    any more, and took most of a core: it waits until the latency is measured."""

    def __init__(self, probe_ids: list[int], tick_s: float):
        super().__init__(daemon=True, name="probe-ticker")
        self.probe_ids = probe_ids
        self.tick_s = tick_s
        self.halt = threading.Event()
        self.sample_ms: list[float] = []
        self.baseline_ms: list[float] = []
        self.round_sample_ms: list[float] = []  # a round of all probes, per customer
        self.tick_cpu_ms = {"watched": [], "unwatched": []}
        self.errors: list[str] = []
        self.timing = threading.Event()

    def run(self) -> None:
        from django.db import connection

        from sending import conductor, live

        try:
            round_ = 0
            while not self.halt.is_set():
                began = time.monotonic()
                watched = round_ % 2 == 0
                ticked = []
                for customer_id in self.probe_ids:
                    if not conductor.acquire_lease(customer_id=customer_id, holder=PROBE_HOLDER):
                        continue
                    ticked.append(customer_id)
                    if watched:
                        live.mark_watched(customer_id)
                    else:
                        live.unmark_watched(customer_id)
                    now_ms = time.time_ns() // 1_000_000
                    if self.timing.is_set():
                        # The live step alone, then the old sample, on the same rows.
                        t0 = time.perf_counter()
                        live.on_tick(customer_id=customer_id, now_ms=now_ms, sending=True)
                        self.sample_ms.append((time.perf_counter() - t0) * 1000)
                        t0 = time.perf_counter()
                        baseline_sample(customer_id=customer_id, now_ms=now_ms)
                        self.baseline_ms.append((time.perf_counter() - t0) * 1000)
                    # A whole tick: this thread's CPU and the publisher's.
                    publisher = [t for t in threading.enumerate() if t.name == "live-publisher"]
                    ids = [threading.get_native_id()] + [t.native_id for t in publisher]
                    cpu0 = sum(_thread_cpu_s(i) for i in ids)
                    t_cpu = time.thread_time()
                    conductor.tick(customer_id=customer_id)
                    own = time.thread_time() - t_cpu
                    others = sum(_thread_cpu_s(i) for i in ids[1:]) - (cpu0 - _thread_cpu_s(ids[0]))
                    self.tick_cpu_ms["watched" if watched else "unwatched"].append(
                        (own + max(others, 0.0)) * 1000
                    )
                if self.timing.is_set() and ticked:
                    # The live step as a conductor round takes it: its customers together.
                    t0 = time.perf_counter()
                    live.on_ticks([live.Tick(c, True) for c in ticked], now_ms=now_ms)
                    self.round_sample_ms.append((time.perf_counter() - t0) * 1000 / len(ticked))
                round_ += 1
                self.halt.wait(max(0.0, self.tick_s - (time.monotonic() - began)))
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


# --- unwatched customers: what reaches their groups --------------------------------------------


def count_unwatched(customer_ids: list[int], seconds: float) -> int:
    """Listen to the live group for `seconds` without keeping any presence, counting the items
    addressed to these customers' pages."""
    from sending import live

    listener = LayerListener()
    listener.start()
    time.sleep(seconds)
    listener.stop()
    addresses = {live.customer_group(customer_id) for customer_id in customer_ids}
    return sum(1 for address in listener.addresses if address in addresses)


# --- one fleet --------------------------------------------------------------------------------


def run_fleet(
    n: int, seconds: float, probes: int, probe_recipients: int, *, watch: bool = True
) -> dict:
    from django.contrib.auth import get_user_model

    from sending import live

    spec = FleetSpec(customers=n)
    fleet = Fleet(spec)
    user_id = None
    watchers = None
    listener = None
    ticker = None
    result: dict = {"customers": n}
    try:
        t0 = time.monotonic()
        fleet.create()
        probe_ids = make_probes(fleet, probes, probe_recipients, PROBE_SENT) if probes else []
        print(f"[{n}] made {n} customers and {len(probe_ids)} probes "
              f"in {time.monotonic() - t0:.1f} s; load {_load()}", flush=True)  # fmt: skip
        fleet.start()
        cookie, user_id = session_cookie()
        ids = [c.customer_id for c in fleet.customers]
        watchers = Watchers(fleet.web_url, cookie, ids if watch else [])
        if watch:
            watchers.start()
            listener = LayerListener()
            listener.start()
        print(f"[{n}] web, Celery worker and beat up; {len(watchers.received)} websockets; "
              f"load {_load()}", flush=True)  # fmt: skip
        _sql(TRIGGER_SQL)
        started = fleet.start_sends()
        if probe_ids:
            ticker = ProbeTicker(probe_ids, spec.tick_ms / 1000)
            ticker.start()
        worker_cpu0 = fleet.cpu_s("celery-worker")
        measure_from = started + 5  # past the first ticks and worker starts
        while time.time() < started + seconds:
            fleet.check_alive()
            time.sleep(1)
        measure_until = time.time()
        worker_cpu = fleet.cpu_s("celery-worker") - worker_cpu0
        if ticker is not None:
            ticker.timing.set()  # the sample against the baseline, while the fleet still sends
        watchers.stop()
        layer_delivered = []
        if listener is not None:
            listener.stop()
            layer_delivered = listener.delivery_ms(measure_from, measure_until)
        events = recorded_events(ids, measure_from, measure_until - 2)
        found, missed = latencies(watchers, events)
        delivered = delivery_ms(watchers, measure_from, measure_until)
        client_lag = [
            lag for at, lag in watchers.loop_lag_ms if measure_from <= at <= measure_until
        ]
        span = measure_until - measure_from
        per_customer = [
            sum(1 for at, m in watchers.received[c] if m.get("type") == "sample"
                and measure_from <= at <= measure_until) / span
            for c in ids
        ] if watch else [0.0]  # fmt: skip
        overview = [m for at, m in watchers.received[None] if measure_from <= at <= measure_until]
        overview_lines = sum(
            len(m["lines"]) if m.get("type") == "lines" else m.get("type") == "line"
            for m in overview
        )
        print(f"[{n}] {len(events)} sends recorded, {len(found)} seen at the pages "
              f"({missed} not before the end); load {_load()}", flush=True)  # fmt: skip
        # Nobody watches now: once the presence keys expire, nothing may reach the groups.
        time.sleep(live.PRESENCE_TTL_S + 1)
        unwatched = count_unwatched(ids, UNWATCHED_S)
        if ticker is not None:
            ticker.stop()
        result.update(
            {
                "latency_p50_ms": _round(_percentile(found, 0.50)),
                "latency_p95_ms": _round(_percentile(found, 0.95)),
                "latency_max_ms": _round(max(found) if found else None),
                "delivery_p50_ms": _round(_percentile(delivered, 0.50)),
                "delivery_p95_ms": _round(_percentile(delivered, 0.95)),
                "layer_delivery_p50_ms": _round(_percentile(layer_delivered, 0.50)),
                "layer_delivery_p95_ms": _round(_percentile(layer_delivered, 0.95)),
                "sends_recorded": len(events),
                "sends_not_seen_before_the_end": missed,
                "messages_per_s_per_customer": _round(statistics.mean(per_customer), 2),
                "messages_per_s_per_customer_max": _round(max(per_customer), 2),
                "overview_messages_per_s": _round(len(overview) / span, 2),
                "overview_lines_per_s": _round(overview_lines / span, 2),
                "unwatched_messages_per_s_per_customer": _round(unwatched / UNWATCHED_S / n, 3),
                "celery_workers_cpu_per_s": _round(worker_cpu / (measure_until - started), 2),
                "conductor_ticks_per_s_per_customer": _round(
                    ticks_per_customer(ids, measure_from, measure_until), 2
                ),
                "client_loop_lag_p95_ms": _round(_percentile(client_lag, 0.95)),
                "bytes_per_message": _round(
                    watchers.bytes_received / max(1, sum(map(len, watchers.received.values())))
                ),
                "measured_s": _round(span, 1),
            }
        )
        if ticker is not None:
            if ticker.errors or not ticker.sample_ms:
                raise RuntimeError(f"probe ticks failed: {ticker.errors[:3]}")
            result.update(
                {
                    "sample_cost_ms": _round(statistics.median(ticker.sample_ms), 2),
                    "baseline_sample_cost_ms": _round(statistics.median(ticker.baseline_ms), 2),
                    "sample_cost_in_round_ms": _round(statistics.median(ticker.round_sample_ms), 2),
                    "sample_cost_p95_ms": _round(_percentile(ticker.sample_ms, 0.95), 2),
                    "baseline_sample_cost_p95_ms": _round(_percentile(ticker.baseline_ms, 0.95), 2),
                    "tick_cpu_ms_watched": _round(
                        statistics.median(ticker.tick_cpu_ms["watched"]), 2
                    ),
                    "tick_cpu_ms_unwatched": _round(
                        statistics.median(ticker.tick_cpu_ms["unwatched"]), 2
                    ),
                    "probe_ticks": len(ticker.sample_ms),
                }
            )
        result["load_avg"] = _load()
        return result
    except Exception:
        for proc in fleet.procs:
            print(f"--- {proc.name} (last lines)\n{proc.tail(2000)}", file=sys.stderr)
        raise
    finally:
        if ticker is not None and ticker.is_alive():
            ticker.stop()
        if watchers is not None:
            with contextlib.suppress(Exception):
                watchers.stop()
        fleet.stop()
        with contextlib.suppress(Exception):
            _sql(DROP_SQL)
        with contextlib.suppress(Exception):
            fleet.delete()
        if user_id is not None:
            get_user_model().objects.filter(pk=user_id).delete()
        live.close_publisher()


def _round(value, digits: int = 1):
    return None if value is None else round(value, digits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.live", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--customers", default="10,100", help="fleet sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=75.0, help="sending time per fleet")
    parser.add_argument("--probes", type=int, default=PROBES)
    parser.add_argument("--probe-recipients", type=int, default=PROBE_RECIPIENTS)
    parser.add_argument(
        "--no-watchers", action="store_true", help="no websocket clients (to compare the fleet)"
    )
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.customers.split(",")]
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    conf = configure_environment(database_url=database_url, redis_url=redis_url)
    print(f"bench.live: load average at start {conf['load']} (2 cores)", flush=True)
    flush_redis(redis_url)
    results = {}
    try:
        for n in sizes:
            results[n] = run_fleet(
                n, args.seconds, args.probes, args.probe_recipients, watch=not args.no_watchers
            )
            print(f"[{n}] {json.dumps(results[n])}", flush=True)
    finally:
        flush_redis(redis_url)
    main_size = max(sizes)
    headline = results[main_size]
    out = {
        "latency_p50_ms": headline["latency_p50_ms"],
        "latency_p95_ms": headline["latency_p95_ms"],
        "messages_per_s_per_customer": headline["messages_per_s_per_customer"],
        "sample_cost_ms": headline.get("sample_cost_ms"),
        "baseline_sample_cost_ms": headline.get("baseline_sample_cost_ms"),
        "at_customers": main_size,
        "by_customers": results,
        "settings": {
            "fleet": FleetSpec(customers=main_size).__dict__,
            "probes": args.probes,
            "probe_recipients": args.probe_recipients,
            "probe_sent": PROBE_SENT,
            "seconds": args.seconds,
            "database": conf["database"],
            "redis": conf["redis"],
        },
        "load_avg": _load(),
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
