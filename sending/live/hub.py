"""The web process's end of the live group: one channel per event loop in LIVE_GROUP, handing each
batch's items to the pages they are addressed to.

With every page's consumer in the group itself, each batch woke every page of the process to
keep the few items addressed to it: with sixteen publisher processes flushing every 100 ms and a
hundred pages watched, some sixteen thousand wake-ups a second, and the web process's inbox fell
behind (docs/benchmarks.md). Here a batch is read once and split by address; a page is handed
only its own items, in order, through a queue of its own, so a slow page delays nobody else and
a page that falls `PAGE_BATCHES` behind loses its oldest (it is drawing stale numbers by then).

A hub starts with its loop's first page and stops with its last, leaving the group; it ends its
receive with a message to itself (a receive cancelled in flight can leave channels_redis's
connection unusable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable

from channels.layers import get_channel_layer

from .presence import LIVE_GROUP

log = logging.getLogger(__name__)

PAGE_BATCHES = 64  # a page's queue: batches it may fall behind before the oldest are dropped
REJOIN_S = 600  # group membership refreshed well within channels_redis's group_expiry (1 day)
RETRY_S = 1.0  # after the channel layer failed
JOIN_TIMEOUT_S = 10  # a page that cannot join in this long is refused (its consumer raises)
STOP = "live.hub.stop"

Deliver = Callable[[list[dict]], Awaitable[None]]

_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Hub] = weakref.WeakKeyDictionary()


async def subscribe(address: str, deliver: Deliver) -> Subscription | None:
    """Hand `deliver` (in order, on this loop) every batch's items addressed to `address`, from
    when this returns until the subscription is closed. None without a channel layer."""
    layer = get_channel_layer()
    if layer is None:
        return None
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = _Hub(layer)
    subscription = Subscription(hub, address, deliver)
    hub.pages[address].add(subscription)
    try:
        await asyncio.wait_for(hub.joined.wait(), JOIN_TIMEOUT_S)
    except BaseException:
        await subscription.close()
        raise
    return subscription


class Subscription:
    """One page's share of its loop's hub: a queue of batches and the task that delivers them."""

    def __init__(self, hub: _Hub, address: str, deliver: Deliver) -> None:
        self.hub = hub
        self.address = address
        self.queue: asyncio.Queue[list[dict]] = asyncio.Queue(PAGE_BATCHES)
        self.dropped = 0
        self.task = asyncio.create_task(self._deliver(deliver))

    def put(self, items: list[dict]) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
            if self.dropped == 1:
                log.warning("live page %s fell %d batches behind: dropping its oldest",
                            self.address, PAGE_BATCHES)  # fmt: skip
        self.queue.put_nowait(items)

    async def _deliver(self, deliver: Deliver) -> None:
        while True:
            items = await self.queue.get()
            try:
                await deliver(items)
            except Exception:  # a page that cannot be sent to is closing: its consumer cleans up
                log.debug("live page %s: delivery failed", self.address, exc_info=True)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.hub.leave(self)


class _Hub:
    def __init__(self, layer) -> None:
        self.layer = layer
        self.pages: defaultdict[str, set[Subscription]] = defaultdict(set)
        self.joined = asyncio.Event()
        self.channel: str | None = None
        self.task = asyncio.create_task(self._run())

    async def leave(self, subscription: Subscription) -> None:
        pages = self.pages.get(subscription.address)
        if pages is not None:
            pages.discard(subscription)
            if not pages:
                del self.pages[subscription.address]
        if self.pages or self.task.done():
            return
        loop = asyncio.get_running_loop()
        if _hubs.get(loop) is self:
            del _hubs[loop]  # a page subscribing from now on starts a new hub
        if self.joined.is_set():
            try:
                await self.layer.send(self.channel, {"type": STOP})
            except Exception as exc:  # the layer is failing: the receive fails too, and ends
                log.warning("live pages: could not stop the hub's receive (%s)", exc)
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), 5)
        else:  # still joining (the layer is failing): no receive in flight to spoil
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        while True:
            try:
                await self._join()
                await self._receive()
                return
            except Exception as exc:  # the channel layer failed: join again, a new channel
                if not self.pages:  # ... unless every page has left meanwhile
                    log.warning("live pages: the channel layer failed (%s); hub stopped", exc)
                    return
                log.warning("live pages: the channel layer failed (%s); joining again", exc)
                await asyncio.sleep(RETRY_S)

    async def _join(self) -> None:
        if self.channel is not None:  # joining again: the old channel would gather batches
            self.joined.clear()
            with contextlib.suppress(Exception):
                await self.layer.group_discard(LIVE_GROUP, self.channel)
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(LIVE_GROUP, self.channel)
        self.joined.set()

    async def _receive(self) -> None:
        rejoin_at = time.monotonic() + REJOIN_S
        while True:
            message = await self.layer.receive(self.channel)
            if message.get("type") == STOP:
                await self.layer.group_discard(LIVE_GROUP, self.channel)
                return
            if time.monotonic() >= rejoin_at:
                await self.layer.group_add(LIVE_GROUP, self.channel)
                rejoin_at = time.monotonic() + REJOIN_S
            if message.get("type") != "live.batch":
                continue
            by_address: defaultdict[str, list[dict]] = defaultdict(list)
            for address, item in message["items"]:
                if address in self.pages:
                    by_address[address].append(item)
            for address, items in by_address.items():
                for subscription in self.pages.get(address, ()):
                    subscription.put(items)
