"""The live pages' websockets, through emailops.asgi's routing (origin check, sessions, auth):
staff only, checked on connect and again while connected, forward-only."""

import contextvars
import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import Group
from django.db import connection
from django.test import Client

from emailops.asgi import application
from sending import live
from tests.factories import CustomerFactory, UserFactory, make_message

HOST = b"127.0.0.1"


@pytest.fixture
def sockets(transactional_db, staff_groups, settings, monkeypatch):
    """The consumers' database work runs in threads of their own, on connections of their own:
    the test's data is committed, and those connections are closed after each use."""
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    settings.LIVE_PERMISSION_RECHECK_S = 0.2


def session_cookie(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


_opened: contextvars.ContextVar[list[WebsocketCommunicator]] = contextvars.ContextVar("opened")


def communicator(path, *, cookie=None, origin=b"http://127.0.0.1:8000"):
    headers = [(b"host", HOST)]
    if origin:
        headers.append((b"origin", origin))
    if cookie is not None:
        headers.append((b"cookie", cookie.encode()))
    socket = WebsocketCommunicator(application, path, headers=headers)
    _opened.get().append(socket)
    return socket


@pytest.fixture
def tick():
    """A conductor's live step for a customer (autocommit: it publishes at once)."""

    def tick(customer_id: int) -> None:
        now_ms = time.time_ns() // 1_000_000
        live.on_tick(customer_id=customer_id, now_ms=now_ms, sending=True)

    return sync_to_async(tick)


def run(coroutine_function):
    """Run a scenario on an event loop of its own, then disconnect every socket it left open
    (refused or closed by the server included), as a browser going away would. A consumer left
    running would be cancelled by the loop's shutdown instead, in the middle of channels_redis's
    blocking pop, and that cancellation can wait forever (seen in 2 of 15 runs of this file)."""

    async def scenario():
        opened = []
        _opened.set(opened)
        try:
            await coroutine_function()
        finally:
            for socket in opened:
                if not socket.future.done():
                    await socket.disconnect()

    return async_to_sync(scenario)()


def test_staff_who_may_watch_get_a_snapshot_then_samples(sockets, tick):
    customer = CustomerFactory()
    message = make_message(customer, 5)
    cookie = session_cookie(UserFactory(groups=["Support"]))
    path = f"/ws/live/customer/{customer.pk}/"

    async def scenario():
        socket = communicator(path, cookie=cookie)
        connected, _ = await socket.connect()
        assert connected
        first = await socket.receive_json_from(timeout=5)
        assert first["type"] == "snapshot"
        assert first["snapshot"]["customer"] == customer.pk
        assert live.watched(customer.pk)  # the conductor's publisher now sends samples
        await tick(customer.pk)
        sample = await socket.receive_json_from(timeout=5)
        assert sample["type"] == "sample"
        assert sample["sample"]["messages"][0]["id"] == message.pk
        # Forward-only: what a client sends changes nothing and is not answered.
        await socket.send_json_to({"per_minute": 1})
        assert await socket.receive_nothing(timeout=0.3)
        await socket.disconnect()

    run(scenario)


def test_each_page_gets_only_what_is_addressed_to_it(sockets, tick):
    """One group for every live page: the publisher's batches carry items addressed to pages,
    and each consumer passes on only its own."""
    first, second = CustomerFactory(), CustomerFactory()
    make_message(first, 5)
    make_message(second, 5)
    cookie = session_cookie(UserFactory(groups=["Support"]))

    async def scenario():
        pages = {}
        for customer in (first, second):
            pages[customer.pk] = communicator(f"/ws/live/customer/{customer.pk}/", cookie=cookie)
        pages[None] = communicator("/ws/live/overview/", cookie=cookie)
        for socket in pages.values():
            assert (await socket.connect())[0]
            assert (await socket.receive_json_from(timeout=5))["type"] == "snapshot"
        await tick(first.pk)
        sample = await pages[first.pk].receive_json_from(timeout=5)
        assert sample["type"] == "sample" and sample["sample"]["customer"] == first.pk
        lines = await pages[None].receive_json_from(timeout=5)  # a batch's lines, in one message
        assert lines["type"] == "lines"
        assert [line["customer"] for line in lines["lines"]] == [first.pk]
        assert await pages[second.pk].receive_nothing(timeout=0.5)
        assert await pages[first.pk].receive_nothing(timeout=0.3)  # one sample, once

    run(scenario)


@pytest.mark.parametrize("who", ["anonymous", "not_staff", "no_permission"])
def test_those_who_may_not_watch_are_refused(sockets, who):
    customer = CustomerFactory()
    user = {
        "anonymous": None,
        "not_staff": lambda: UserFactory(is_staff=False, groups=["Support"]),
        "no_permission": lambda: UserFactory(),
    }[who]
    cookie = session_cookie(user()) if user else None

    async def scenario():
        socket = communicator(f"/ws/live/customer/{customer.pk}/", cookie=cookie)
        connected, code = await socket.connect()
        assert not connected
        assert code == 4403

    run(scenario)


def test_a_page_of_another_origin_is_refused(sockets):
    cookie = session_cookie(UserFactory(groups=["Operators"]))

    async def scenario():
        for origin in (b"http://evil.example", None):
            socket = communicator("/ws/live/overview/", cookie=cookie, origin=origin)
            connected, _ = await socket.connect()
            assert not connected, origin

    run(scenario)


def demote(user):
    user.groups.remove(Group.objects.get(name="Operators"))


def log_out(user):
    from django.contrib.sessions.models import Session

    Session.objects.all().delete()


@pytest.mark.parametrize("change", [demote, log_out], ids=["demoted", "logged out"])
def test_a_user_who_may_no_longer_watch_is_disconnected(sockets, change):
    operator = UserFactory(groups=["Operators"])
    cookie = session_cookie(operator)

    async def scenario():
        socket = communicator("/ws/live/overview/", cookie=cookie)
        connected, _ = await socket.connect()
        assert connected
        assert (await socket.receive_json_from(timeout=5))["type"] == "snapshot"
        assert await socket.receive_nothing(timeout=0.5)  # still allowed: still connected
        await sync_to_async(change)(operator)
        closed = await socket.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": 4403}

    run(scenario)


def test_an_unknown_customer_is_refused(sockets):
    cookie = session_cookie(UserFactory(groups=["Operators"]))

    async def scenario():
        socket = communicator("/ws/live/customer/999999/", cookie=cookie)
        connected, code = await socket.connect()
        assert not connected and code == 4404

    run(scenario)


def test_a_page_with_nothing_to_show_for_a_while_stays_connected(sockets, tick, redis_url):
    """Through Redis: a page waits longer than one blocking pop (5 s) without a message."""
    customer = CustomerFactory()
    make_message(customer, 3)
    cookie = session_cookie(UserFactory(groups=["Operators"]))

    async def scenario():
        socket = communicator(f"/ws/live/customer/{customer.pk}/", cookie=cookie)
        connected, _ = await socket.connect()
        assert connected
        assert (await socket.receive_json_from(timeout=5))["type"] == "snapshot"
        assert await socket.receive_nothing(timeout=7, interval=0.5)
        await tick(customer.pk)
        assert (await socket.receive_json_from(timeout=5))["type"] == "sample"
        await socket.disconnect()

    run(scenario)
