"""Publishing live samples: the conductor's per-tick step, and the one event loop per process
that sends them through the channel layer.

The conductor is the only writer for its customer (one chain at a time holds the customer's
ConductorLease), so the per-customer state kept in the cache — the last counts, the per-second
points of the last ten minutes, the steadied rate — needs no lock.

After commit, at most one message every PUBLISH_EVERY_MS a customer, only while it is sending,
and only when someone watches — the consumers keep a presence key with a short TTL in the cache,
and the publisher checks it. Messages go out through one event loop per process (a daemon
thread), so channels_redis keeps one connection pool per process instead of one per publish:
`async_to_sync` would run each publish on a new event loop, and channels_redis keeps a pool per
loop until `close_pools()` is called.

The loop gathers what is published within FLUSH_EVERY_MS and sends it as one batch to LIVE_GROUP,
each item addressed to a page's group; in the web process, the hub (sending/live/hub.py) reads
each batch once and hands every page the items addressed to it. When each sample went to its
page's group as a message of its own, each was one message in the web process's inbox: at a
hundred watched customers about 280 a second, each received with four Redis round trips, and
channels_redis keeps at most 100 messages a channel, so most were dropped (docs/benchmarks.md).
A batch is one message per web process, whatever it holds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from channels.layers import get_channel_layer
from django.core.cache import cache
from django.db import DatabaseError, transaction

from .. import alerts
from .presence import LIVE_GROUP, OVERVIEW_GROUP, customer_group, key, watch_key, watched
from .samples import SECONDS_KEPT, build, overview_line, read_rows_many

log = logging.getLogger(__name__)

PUBLISH_EVERY_MS = 250  # at most 4 messages a second a customer
OVERVIEW_EVERY_MS = 1000  # the overview gets each customer's line at most once a second
# The publisher sends what it was given at most this often, as one batch: each of the Celery
# processes that tick customers does, so the web process reads up to a hundred and sixty batches
# a second at sixteen processes. Its hub wakes only the pages a batch holds items for; when every
# page was woken by every batch, 100 ms was too often and 250 ms added its wait to every sample
# (docs/benchmarks.md).
FLUSH_EVERY_MS = 100
STATE_TTL_S = SECONDS_KEPT + 60


# --- the conductor's step -------------------------------------------------------------------


def on_tick(*, customer_id: int, now_ms: int, sending: bool, lost: int = 0) -> dict | None:
    """Called by each conductor tick: record the customer's per-second point, check its alerts
    and publish a sample if someone watches. Returns the sample (None when idle)."""
    return on_ticks([Tick(customer_id, sending, lost)], now_ms=now_ms)[customer_id]


@dataclass(frozen=True)
class Tick:
    """One customer's part of a conductor round's live step."""

    customer_id: int
    sending: bool
    lost: int = 0


def on_ticks(ticks: list[Tick], *, now_ms: int) -> dict[int, dict | None]:
    """`on_tick` for the customers a conductor round ticks together, with the same two
    statements and two cache round trips for all of them: a round that read and wrote each
    customer's rows and cache entries in turn spent most of its time waiting for those round
    trips on a busy machine, and its next round started late (docs/benchmarks.md). A customer
    whose sample cannot be built is logged and left out (None); the others go on."""
    samples: dict[int, dict | None] = {t.customer_id: None for t in ticks}
    idle = [t.customer_id for t in ticks if not t.sending]
    if idle:
        states = cache.get_many([key("state", c) for c in idle])
        for customer_id in idle:
            if states.get(key("state", customer_id)) is not None:
                # One last sample, so that open pages see the send end.
                cache.delete(key("state", customer_id))
                _publish_final(customer_id, now_ms)
    sending = [t for t in ticks if t.sending]
    if not sending:
        return samples
    # Two statements and two cache round trips a round: the rows, then everything the cache
    # holds for them at once (the states, who watches, the messages' sizes), then the writes.
    everyone = read_rows_many([t.customer_id for t in sending], now_ms)
    wanted = [watch_key(None)]
    for t in sending:
        wanted += [key("state", t.customer_id), watch_key(t.customer_id)]
        wanted += [key("msg", m["id"]) for m in everyone[t.customer_id]["messages"]]
    cached = cache.get_many(wanted)
    writes: dict[str, dict] = {}
    outgoing = []
    for t in sending:
        try:
            sample, state = _sample(t, now_ms, everyone[t.customer_id], cached, outgoing)
        except DatabaseError:
            raise  # the connection's state is the caller's to handle
        except Exception:
            log.exception("customer %s: live sample failed", t.customer_id)
            continue
        writes[key("state", t.customer_id)] = state
        writes[key("last", t.customer_id)] = sample
        samples[t.customer_id] = sample
    if writes:
        cache.set_many(writes, STATE_TTL_S)
    if outgoing:
        transaction.on_commit(lambda: publish(outgoing))
    return samples


def _sample(t: Tick, now_ms: int, rows: dict, cached: dict, outgoing: list) -> tuple[dict, dict]:
    """One customer's sample and state; what it publishes is added to `outgoing`."""
    customer_id = t.customer_id
    sample, state = build(
        customer_id, now_ms, cached.get(key("state", customer_id)), rows=rows, cached=cached
    )
    sample["alerts"] = alerts.check(sample, lost=t.lost)
    if now_ms - state.get("published", 0) >= PUBLISH_EVERY_MS and cached.get(
        watch_key(customer_id)
    ):
        outgoing.append((customer_group(customer_id), {"type": "live.sample", "sample": sample}))
        state["published"] = now_ms
    if now_ms - state.get("overview", 0) >= OVERVIEW_EVERY_MS and cached.get(watch_key(None)):
        outgoing.append((OVERVIEW_GROUP, {"type": "live.line", "line": overview_line(sample)}))
        state["overview"] = now_ms
    return sample, state


def _publish_final(customer_id: int, now_ms: int) -> None:
    cache.delete(key("last", customer_id))
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


def _run(loop: asyncio.AbstractEventLoop) -> None:
    """The publisher thread: the loop until `close_publisher` stops it, then closed here (left
    to the garbage collector, it would be closed in whatever thread collects it)."""
    try:
        loop.run_forever()
    finally:
        loop.close()


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
            threading.Thread(target=_run, args=(_loop,), name="live-publisher", daemon=True).start()
        return _layer, _loop


class _Outbox:
    """What one publisher loop gathers until its next flush (used only on that loop)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict]] = []
        self.sent = asyncio.get_running_loop().create_future()
        self.flush: asyncio.Task | None = None


_outboxes: dict[asyncio.AbstractEventLoop, _Outbox] = {}


async def _flush_later(layer, loop: asyncio.AbstractEventLoop, box: _Outbox) -> None:
    await asyncio.sleep(FLUSH_EVERY_MS / 1000)
    if _outboxes.get(loop) is box:
        del _outboxes[loop]  # what comes from now on goes in the next batch
    try:
        await layer.group_send(LIVE_GROUP, {"type": "live.batch", "items": box.items})
    except Exception as exc:  # best effort: a channel-layer outage must not stop sending
        log.warning("could not publish %d live messages: %s", len(box.items), exc)
        box.sent.set_result(False)
    else:
        box.sent.set_result(True)


async def _post(layer, outgoing: list[tuple[str, dict]]) -> bool:
    """Add to this loop's next batch (starting one if none is open); True once it is sent."""
    loop = asyncio.get_running_loop()
    box = _outboxes.get(loop)
    if box is None:
        box = _outboxes[loop] = _Outbox()
        box.flush = loop.create_task(_flush_later(layer, loop, box))
    box.items.extend(outgoing)
    return await asyncio.shield(box.sent)


def publish(outgoing: list[tuple[str, dict]], *, wait_s: float | None = None) -> bool:
    """Send (group, message) pairs through the channel layer, in the publisher's next batch;
    best effort: a channel-layer outage must not stop sending (it is logged). With `wait_s`,
    wait for the batch to be sent (tests, benches) and say whether it was."""
    layer, loop = _publisher()
    if layer is None:
        return False
    future = asyncio.run_coroutine_threadsafe(_post(layer, outgoing), loop)

    def done(f):
        if not f.cancelled() and f.exception() is not None:
            log.warning("could not publish a live sample: %s", f.exception())

    future.add_done_callback(done)
    if wait_s is not None:
        return future.result(wait_s)
    return True


async def _drain_and_close(layer) -> None:
    """Send the batch still gathering on this loop, then close the layer's pools."""
    box = _outboxes.get(asyncio.get_running_loop())
    if box is not None and box.flush is not None:
        await box.flush
    close = getattr(layer, "close_pools", None)
    if close is not None:
        await close()


def close_publisher(timeout_s: float = 5) -> None:
    """Send the batch still gathering, close the publisher's connection pool and stop its loop
    (process shutdown, tests)."""
    global _loop, _layer
    with _loop_lock:
        loop, layer, _loop, _layer = _loop, _layer, None, None
    if loop is None:
        return
    asyncio.run_coroutine_threadsafe(_drain_and_close(layer), loop).result(timeout_s)
    loop.call_soon_threadsafe(loop.stop)
