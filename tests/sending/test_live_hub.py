"""The web process's end of the live group (sending/live/hub.py), on the configured channel layer
(Redis when REDIS_URL is set, as in CI; the in-memory layer otherwise): each page gets its own
items in order, a slow page delays no other, one that falls behind loses its oldest batches, and
the hub leaves the group with its last page."""

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from sending import live
from sending.live import hub
from tests.net import free_port


def run(scenario):
    async def checked():
        await scenario()
        # Every scenario closes its subscriptions: the loop's hub is gone, its task ended.
        assert asyncio.get_running_loop() not in hub._hubs

    async_to_sync(checked)()


async def batch(*items):
    await get_channel_layer().group_send(
        live.LIVE_GROUP, {"type": "live.batch", "items": [list(i) for i in items]}
    )


class Page:
    def __init__(self, *, blocked: bool = False):
        self.got: list[list[dict]] = []
        self.arrived = asyncio.Event()
        self.open = asyncio.Event()
        if not blocked:
            self.open.set()

    async def deliver(self, items):
        await self.open.wait()
        self.got.append(items)
        self.arrived.set()

    async def has(self, n: int, timeout: float = 5) -> None:
        """Wait until `n` batches have been delivered."""
        async with asyncio.timeout(timeout):
            while len(self.got) < n:
                self.arrived.clear()
                await self.arrived.wait()


def test_each_page_gets_only_its_own_items_in_order():
    async def scenario():
        one, two = Page(), Page()
        subscriptions = [
            await live.subscribe("a", one.deliver),
            await live.subscribe("b", two.deliver),
        ]
        await batch(("a", {"n": 1}), ("b", {"n": 2}), ("a", {"n": 3}), ("c", {"n": 4}))
        await one.has(1)
        await two.has(1)
        assert one.got == [[{"n": 1}, {"n": 3}]]
        assert two.got == [[{"n": 2}]]
        for subscription in subscriptions:
            await subscription.close()

    run(scenario)


def test_a_slow_page_delays_no_other_and_loses_only_its_oldest(monkeypatch):
    monkeypatch.setattr(hub, "PAGE_BATCHES", 2)

    async def scenario():
        slow, fast = Page(blocked=True), Page()
        subscriptions = [
            await live.subscribe("slow", slow.deliver),
            await live.subscribe("fast", fast.deliver),
        ]
        for n in range(5):
            await batch(("slow", {"n": n}), ("fast", {"n": n}))
            await fast.has(n + 1)  # the fast page gets each batch while the slow one is stuck
        assert [items[0]["n"] for items in fast.got] == [0, 1, 2, 3, 4]
        assert slow.got == []
        slow.open.set()
        await slow.has(3)
        # The batch it was stuck on, then the newest two its queue kept; 1 and 2 were dropped.
        assert [items[0]["n"] for items in slow.got] == [0, 3, 4]
        assert subscriptions[0].dropped == 2
        for subscription in subscriptions:
            await subscription.close()

    run(scenario)


def test_the_hub_leaves_the_group_with_its_last_page_and_a_new_page_starts_another():
    async def scenario():
        page = Page()
        first = await live.subscribe("a", page.deliver)
        old = hub._hubs[asyncio.get_running_loop()]
        await first.close()
        assert old.task.done()
        again = await live.subscribe("a", page.deliver)
        assert hub._hubs[asyncio.get_running_loop()] is not old
        await batch(("a", {"n": 1}))
        await page.has(1)
        assert page.got == [[{"n": 1}]]
        await again.close()

    run(scenario)


def test_a_page_is_refused_when_the_channel_layer_is_down_and_no_hub_is_left(settings, monkeypatch):
    """A Redis that refuses connections (a port nothing listens on): joining fails, the page's
    subscribe raises after the join timeout, and the hub stops once its last page has gone."""
    port = free_port()
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{port}/0"]},
        }
    }
    monkeypatch.setattr(hub, "JOIN_TIMEOUT_S", 1)
    monkeypatch.setattr(hub, "RETRY_S", 0.1)

    async def scenario():
        with pytest.raises(asyncio.TimeoutError):
            await live.subscribe("a", Page().deliver)

    run(scenario)
