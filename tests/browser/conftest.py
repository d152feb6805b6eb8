"""The browser harness: Debian's Chromium, driven by Playwright's sync API, against the project's
ASGI application served by uvicorn (`asgi_server`).

A test makes its data, then browses, then reads the database:

    message = MessageFactory()
    with browse(support_user) as page:      # Chromium, signed in as that user
        page.goto(...); page.get_by_role("button", name="Send now").click()
        expect(page.locator(...)).to_have_text(...)
    message.refresh_from_db()

No database call inside the `with`. While Playwright is started its event loop is registered as
running in the test thread, and Django takes that thread for async code: the ORM refuses to run
(SynchronousOnlyOperation), and the connection it would use is no longer the thread's (asgiref's
Local switches to per-context storage), so it would not be the connection pytest-django set up,
flushes and restores. Starting Playwright inside each test, after the database is ready, and
stopping it before the test ends keeps Django's checks on everywhere, including here. The price
is a Chromium start per `browse` (about a second).

Every test in this folder is marked `browser`. A failure inside `browse` saves a full-page
screenshot to test-output/<test>/ first, and so does an uncaught JavaScript error on the page or
anything the Content-Security-Policy blocked (Chromium reports it on the console).
"""

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from playwright.sync_api import Page, sync_playwright

from tests.conftest import _missing
from tests.factories import SuperUserFactory, UserFactory

CHROMIUM = "/usr/bin/chromium"
# The machine's network is closed: Chromium's own background connections (updates, sync, field
# trials, QUIC probes) would only wait and fail, so none are made. `--no-sandbox`: CI runs as
# root, where Chromium's sandbox cannot start.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HERE = Path(__file__).parent
OUTPUT = HERE.parent.parent / "test-output"


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session", autouse=True)
def _fresh_test_output():
    """Screenshots of an earlier run's failures would be mistaken for this run's."""
    shutil.rmtree(OUTPUT, ignore_errors=True)


@pytest.fixture
def live(asgi_server, staff_groups):
    """The live server, with the staff groups in place."""
    return asgi_server


@pytest.fixture
def browse(live, request):
    """browse(user=None): a context manager that starts Chromium (a fresh profile) and gives a
    page on the live server (relative URLs work), signed in as `user` through a session made as
    Django's test client's force_login makes one. Signing in through the form is tested once,
    in test_login.py; every other test starts signed in."""

    @contextmanager
    def browse(user=None) -> Iterator[Page]:
        if not os.access(CHROMIUM, os.X_OK):
            _missing(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
        cookies = []
        if user is not None:
            client = Client()
            client.force_login(user)
            session = client.cookies[settings.SESSION_COOKIE_NAME].value
            cookies.append(
                {"name": settings.SESSION_COOKIE_NAME, "value": session, "url": live.url}
            )
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(base_url=live.url)
                context.add_cookies(cookies)
                page = context.new_page()
                errors = []
                page.on("pageerror", lambda error: errors.append(error))
                # The site's Content-Security-Policy allows no inline script or style: whatever
                # it blocked, Chromium reports on the console.
                refused = []
                page.on(
                    "console",
                    lambda message: (
                        refused.append(message.text)
                        if "Content Security Policy" in message.text
                        else None
                    ),
                )
                try:
                    yield page
                    assert not errors, f"JavaScript errors on the page: {errors}"
                    assert not refused, f"Blocked by the Content-Security-Policy: {refused}"
                except BaseException:
                    _screenshot(page, request.node)
                    raise
            finally:
                browser.close()

    return browse


def _screenshot(page: Page, node, name: str = "failure") -> None:
    folder = OUTPUT / re.sub(r"[^\w.-]+", "-", node.nodeid).strip("-")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    if name == "failure":
        print(f"screenshot of the page at the failure: {path}")


@pytest.fixture
def screenshot(request):
    """screenshot(page, name): keep a full-page screenshot under test-output/<test>/<name>.png,
    to look at (every page the tests open is looked at this way, not only failures)."""
    return lambda page, name: _screenshot(page, request.node, name)


@pytest.fixture
def superuser(live):
    return SuperUserFactory(username="admin")


@pytest.fixture
def support_user(live):
    return UserFactory(username="support", groups=["Support"])


@pytest.fixture
def operator_user(live):
    return UserFactory(username="operator", groups=["Operators"])


@pytest.fixture(autouse=True)
def conductor_kicks(enqueued_tasks):
    """Customer ids of the conductor ticks the pages' actions enqueued since the last call, read
    back from the broker (no Celery worker runs in these tests, and none is needed to see that
    a send started)."""

    def kicked() -> list[int]:
        return [args[0] for name, args in enqueued_tasks.take() if name == "sending.tasks.conduct"]

    return kicked
