"""Staff-only, forward-only websocket consumers for the live pages.

A consumer checks the user's permissions when it connects and again every
LIVE_PERMISSION_RECHECK_S, reading the session and the user afresh: a user logged out (the
session is gone), deactivated, or demoted (a permission taken away) is disconnected with code
4403. The same loop keeps the presence key the conductor's publisher checks. On connect the
page gets a snapshot (per-minute history, the last ten minutes of per-second points, the last
sample), so a reconnect resumes where the page left off; then every sample the conductor
publishes for the page. Nothing a client sends is acted on.

The publisher sends batches to one channel-layer group, `live.LIVE_GROUP`, each item addressed
to a page (`group()`: a customer's, or the overview). A consumer subscribes to its address at
its loop's hub (`live.subscribe`, sending/live/hub.py), which reads each batch once and hands
the consumer the items addressed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from channels.auth import get_user
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.sessions.backends.base import SessionBase
from django.utils.module_loading import import_string

from . import live
from .permissions import may_watch

log = logging.getLogger(__name__)

FORBIDDEN = 4403


def recheck_seconds() -> float:
    return float(getattr(settings, "LIVE_PERMISSION_RECHECK_S", 5))


async def _user_now(session_key: str | None):
    """The session's user as of now (AnonymousUser if the session ended)."""
    store: type[SessionBase] = import_string(settings.SESSION_ENGINE + ".SessionStore")
    return await get_user({"session": store(session_key)})


class LiveConsumer(AsyncJsonWebsocketConsumer):
    customer_id: int | None = None  # None: the overview
    watcher: asyncio.Task | None = None  # set once the socket is accepted
    subscription: live.Subscription | None = None  # the page's items, from its loop's hub

    def group(self) -> str:
        """The address of this page's items in the publisher's batches."""
        raise NotImplementedError

    async def snapshot(self) -> dict:
        raise NotImplementedError

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not await database_sync_to_async(may_watch)(user):
            await self.close(code=FORBIDDEN)
            return
        self.session_key = self.scope["session"].session_key
        self.user_id = user.pk
        live.register_consumer_loop(asyncio.get_running_loop())
        # Subscribed before the snapshot is read, so nothing published after it is missed; what
        # comes meanwhile waits in the subscription's queue until the snapshot has gone out.
        self.opened = asyncio.Event()
        self.subscription = await live.subscribe(self.group(), self._deliver_when_open)
        await self.accept()
        await database_sync_to_async(live.mark_watched)(self.customer_id)
        await self.send_json({"type": "snapshot", "snapshot": await self.snapshot()})
        self.opened.set()
        self.watcher = asyncio.create_task(self._watch())

    async def disconnect(self, code):
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
        if self.subscription is not None:
            await self.subscription.close()
            self.subscription = None

    async def _watch(self):
        """Keep presence and re-check permissions until the socket closes."""
        presence_every = live.PRESENCE_TTL_S / 3
        next_presence = time.monotonic() + presence_every
        while True:
            await asyncio.sleep(min(recheck_seconds(), presence_every))
            user = await _user_now(self.session_key)
            allowed = user.pk == self.user_id and await database_sync_to_async(may_watch)(user)
            if not allowed:
                log.info("live page closed: user %s may no longer watch", self.user_id)
                await self.close(code=FORBIDDEN)
                return
            if time.monotonic() >= next_presence:
                await database_sync_to_async(live.mark_watched)(self.customer_id)
                next_presence = time.monotonic() + presence_every

    async def receive_json(self, content, **kwargs):
        pass  # forward-only: steering goes through the page's form, with CSRF and a permission

    # What the publisher sends ----------------------------------------------------------------

    async def _deliver_when_open(self, items: list[dict]) -> None:
        await self.opened.wait()
        await self.deliver(items)

    async def deliver(self, items: list[dict]) -> None:
        """The items of a batch addressed to this page, each to its handler (from the hub: not
        through channels' dispatch, whose per-message hop to close stale database connections
        the live handlers, using no database, do not need)."""
        for item in items:
            kind = item.get("type", "")
            handler = None
            if kind.startswith("live.") and kind != "live.batch":
                handler = getattr(self, get_handler_name(item), None)
            if handler is None:
                log.warning("live page: no handler for %r", kind)
            else:
                await handler(item)

    async def live_sample(self, event):
        await self.send_json({"type": "sample", "sample": event["sample"]})

    async def live_line(self, event):
        await self.send_json({"type": "line", "line": event["line"]})

    async def live_annotation(self, event):
        await self.send_json({"type": "annotation", "annotation": event["annotation"]})

    async def live_idle(self, event):
        await self.send_json({"type": "idle", "customer": event["customer"], "t": event["t"]})


class CustomerLiveConsumer(LiveConsumer):
    async def connect(self):
        self.customer_id = int(self.scope["url_route"]["kwargs"]["customer_id"])
        exists = await database_sync_to_async(_customer_exists)(self.customer_id)
        if not exists:
            await self.close(code=4404)
            return
        await super().connect()

    def group(self) -> str:
        return live.customer_group(self.customer_id)

    async def snapshot(self) -> dict:
        return await database_sync_to_async(live.snapshot)(self.customer_id, _now_ms())


class OverviewConsumer(LiveConsumer):
    def group(self) -> str:
        return live.OVERVIEW_GROUP

    async def deliver(self, items: list[dict]) -> None:
        """A batch's lines go to the page as one message (a hundred customers sending: about
        ninety lines a second, in a few messages instead of ninety)."""
        lines = [item["line"] for item in items if item.get("type") == "live.line"]
        if lines:
            await self.send_json({"type": "lines", "lines": lines})
        await super().deliver([item for item in items if item.get("type") != "live.line"])

    async def snapshot(self) -> dict:
        from .overview import overview

        return await database_sync_to_async(overview)(_now_ms())


def _customer_exists(customer_id: int) -> bool:
    from customers.models import Customer

    return Customer.objects.filter(pk=customer_id).exists()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
