"""The live pages in Chromium, during a real local send.

Everything is real but the length of a minute (4 s): the worker API and the websockets are served
by `live` (uvicorn, emailops.asgi), local workers run the real handler in threads, mail goes to a
sandbox provider whose clock runs 15 times faster so that its calendar minute is one of ours, and
a conductor ticks in a thread of its own, as a Celery worker would run it. The database is read
only outside `browse`, or from a thread of its own (see conftest).
"""

import re
import threading
import time

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.urls import reverse
from playwright.sync_api import Page, expect

from customers.models import SendLimit
from sending import conductor
from sending.models import CustomerMinute, Lease, Message, Worker
from sending.runtimes import LocalRuntime, shutdown_local_workers
from sending.sandbox import Latency, SandboxServer
from tests.factories import (
    API_KEY,
    CustomerFactory,
    CustomerMinuteFactory,
    LeaseFactory,
    WorkerFactory,
    make_message,
    sandbox_customer,
)

WINDOW_MS = 4_000
TICK_S = 0.2


def in_thread(fn, *args):
    """Run `fn` on a database connection of its own (the test thread's is Playwright's while a
    browser runs) and return its result."""
    result, errors = [], []

    def run():
        try:
            result.append(fn(*args))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if errors:
        raise errors[0]
    return result[0]


class Conductor(threading.Thread):
    """A conductor chain, ticking every TICK_S as the Celery task does (lease, then tick)."""

    def __init__(self, customer_id: int):
        super().__init__(daemon=True)
        self.customer_id = customer_id
        self.runtime = LocalRuntime(mode="thread", timeout_s=30)
        self.halt = threading.Event()
        self.errors: list[BaseException] = []

    def run(self):
        try:
            while not self.halt.is_set():
                if conductor.acquire_lease(customer_id=self.customer_id, holder="browser-test"):
                    conductor.tick(customer_id=self.customer_id, runtime=self.runtime)
                self.halt.wait(TICK_S)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            connection.close()

    def stop(self):
        self.halt.set()
        self.join(10)
        assert not self.errors, self.errors


@pytest.fixture
def fast_live(live, postgres, fast_minutes, settings):
    settings.SEND_WINDOW_MS = WINDOW_MS
    settings.WORKER_API_TIMEOUT_S = 1  # within the guard band, as in test_faults
    settings.WORKER_API_URL = f"{live.url}/api/worker/v1/"
    settings.LIVE_PERMISSION_RECHECK_S = 0.3
    yield live
    assert shutdown_local_workers(timeout_s=10), "a local worker is still running"


@pytest.fixture
def sending(fast_live):
    """A customer at 40 a (4-second) minute, one worker, one call in flight, 100 ms a send:
    one worker cannot fill a minute, so more workers send more. Its message is sending."""
    sandbox = SandboxServer(
        caps={API_KEY: 40},
        clock=lambda: time.time_ns() // 1_000_000 * 60_000 // WINDOW_MS,
        latency=Latency(median_ms=100),
    ).start()
    customer = sandbox_customer(sandbox, per_minute=40, batch_size=10, concurrency=1)
    SendLimit.objects.filter(customer=customer).update(max_workers=1, guard_ms=1_000)
    message = make_message(customer, 400)
    chain = Conductor(customer.pk)
    chain.start()
    yield customer, message, sandbox
    chain.stop()
    Message.objects.filter(pk=message.pk).update(status=Message.Status.CANCELLED)
    shutdown_local_workers(timeout_s=10)
    sandbox.stop()


def live_url(customer) -> str:
    return reverse("admin:sending_live_customer", args=[customer.pk])


def chart(page: Page, name: str) -> list:
    return page.evaluate(f"window.emailopsLive.series().{name}")


def wait_for(page: Page, predicate, *, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        page.wait_for_timeout(200)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def ledger(customer_id: int) -> dict[int, dict]:
    fields = ("cap", "granted", "refunded", "carried_in", "sent", "failed", "throttled")
    return {
        round(row["minute_start"].timestamp() * 1000): {f: row[f] for f in fields}
        for row in CustomerMinute.objects.filter(customer_id=customer_id).values(
            "minute_start", *fields
        )
    }


def steer(page: Page, **values) -> None:
    form = page.locator("#live-steer")
    for name, value in values.items():
        form.locator(f"[name={name}]").fill(str(value))
    form.get_by_role("button", name="Apply").click()
    expect(page.locator(".messagelist .success")).to_contain_text("Changed:")
    wait_until_drawn(page)


def wait_until_drawn(page: Page) -> None:
    """The page's script (deferred) has run: its charts and data are there."""
    wait_for_script(page, "window.emailopsLive !== undefined && !!window.emailopsLive.series")


def wait_for_script(page: Page, expression: str, timeout_s: float = 15) -> None:
    """Poll `expression` from here. Not `page.wait_for_function`: when its first check is false,
    it polls with `eval` inside the page, which the live pages' Content-Security-Policy (no
    'unsafe-eval') refuses; `page.evaluate` goes through the browser's debugging protocol."""
    wait_for(page, lambda: page.evaluate(expression), timeout_s=timeout_s, what=expression)


def test_an_operator_watches_a_send_and_steers_it(browse, operator_user, sending, screenshot):
    customer, message, sandbox = sending
    with browse(operator_user) as page:
        response = page.goto(live_url(customer))
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        expect(page.locator("#live-connection")).to_have_text("live")
        wait_until_drawn(page)
        # Drawn: three charts' canvases, and samples arriving over the websocket.
        expect(page.locator(".live-chart canvas")).to_have_count(3)
        wait_for(page, lambda: page.evaluate("window.emailopsLive.samples") > 3,
                 timeout_s=15, what="samples")  # fmt: skip

        # One worker may run; allow three, and the worker count follows.
        steer(page, max_workers=3)
        wait_for(page, lambda: max(p[2] for p in chart(page, "seconds")) > 1,
                 timeout_s=20, what="a second worker")  # fmt: skip
        workers_seen = {p[2] for p in chart(page, "seconds")}
        assert len(workers_seen) >= 2, workers_seen

        # Halve the cap: the next whole minute is charged and sent at the new cap.
        steer(page, per_minute=20)
        changed_at = time.time() * 1000
        expect(page.locator("#live-annotations")).to_contain_text("per minute 40 → 20")
        first_full = changed_at - changed_at % WINDOW_MS + WINDOW_MS

        def a_full_minute_at_the_new_cap_is_over():
            done = [m for m in chart(page, "minutes") if m["t"] >= first_full and m["sent"]]
            return time.time() * 1000 > first_full + 3 * WINDOW_MS and done

        wait_for(page, a_full_minute_at_the_new_cap_is_over, timeout_s=30,
                 what="a minute at the new cap")  # fmt: skip

        # What the chart shows is what the ledger holds, for every minute that is settled.
        settled_before = time.time() * 1000 - 2 * WINDOW_MS

        def chart_matches_ledger():
            rows = in_thread(ledger, customer.pk)
            shown = {m["t"]: m for m in chart(page, "minutes") if m["t"] < settled_before}
            compared = {
                t: ({k: shown[t][k] for k in row}, row) for t, row in rows.items() if t in shown
            }
            mismatched = {t: pair for t, pair in compared.items() if pair[0] != pair[1]}
            return (len(compared) >= 3 and not mismatched, compared, mismatched)

        matched = wait_for(page, lambda: chart_matches_ledger()[0] and chart_matches_ledger(),
                           timeout_s=10, what="the chart to match the ledger")  # fmt: skip
        compared = matched[1]
        after = [row for t, (_, row) in compared.items() if t >= first_full]
        assert after and all(row["cap"] == 20 and row["sent"] <= 20 for row in after), after
        assert any(row["sent"] == 20 for row in after), after
        screenshot(page, "live-customer")

        # The message page follows the send too.
        page.goto(reverse("admin:sending_message_change", args=[message.pk]))
        wait_for_script(page, "window.emailopsLive !== undefined")
        live_progress = page.locator(".message-live progress")
        wait_for(page, lambda: page.evaluate("window.emailopsLive.samples") > 1,
                 timeout_s=10, what="samples on the message page")  # fmt: skip
        assert float(live_progress.get_attribute("value") or 0) > 0
        screenshot(page, "message-live")

    limit = SendLimit.objects.get(customer=customer)
    assert (limit.per_minute, limit.max_workers) == (20, 3)
    changes = list(
        limit.history.order_by("history_date").values_list("history_user__username", flat=True)
    )
    assert changes[-2:] == ["operator", "operator"]
    assert Worker.objects.filter(customer=customer).count() > 1
    report = sandbox.report()
    assert report["over_cap_minutes"] == {} and report["duplicates"] == {}


def test_support_sees_no_controls_and_a_forged_change_is_refused(browse, support_user, screenshot):
    customer = CustomerFactory(name="Harbour College", per_minute=600)
    url = reverse("admin:sending_live_steer", args=[customer.pk])
    with browse(support_user) as page:
        page.goto(live_url(customer))
        expect(page.locator("h1")).to_have_text("Live: Harbour College")
        expect(page.locator("#live-steer")).to_have_count(0)
        expect(page.locator(".live-steer")).to_contain_text("the Operators group")
        screenshot(page, "live-customer-support")
        token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
        forged = page.request.post(
            url,
            form={"csrfmiddlewaretoken": token, "per_minute": "1", "was_per_minute": "600",
                  "max_workers": "5", "concurrency": "16"},
            headers={"Referer": page.url},
            max_redirects=0,
        )  # fmt: skip
        assert forged.status == 403
        assert "CSRF" not in forged.text()  # refused for the permission, not the token
    limit = SendLimit.objects.get(customer=customer)
    assert limit.per_minute == 600 and limit.history.count() == 1


def open_socket(page: Page, url: str) -> dict:
    """Open a websocket from the page; how it ended: opened or not, and its close code."""
    return page.evaluate(
        """url => new Promise(done => {
            const socket = new WebSocket(url); let opened = false;
            socket.onopen = () => { opened = true; };
            socket.onclose = event => done({opened, code: event.code});
            setTimeout(() => done({opened, code: null}), 5000);
        })""",
        url,
    )


def test_an_anonymous_or_foreign_page_gets_no_websocket(browse, live, operator_user):
    customer = CustomerFactory()
    ws = live.url.replace("http://", "ws://") + f"/ws/live/customer/{customer.pk}/"
    with browse() as page:  # signed out
        page.goto(reverse("admin:login"))
        assert open_socket(page, ws) == {"opened": False, "code": 1006}
    with browse(operator_user) as page:
        # A page of another origin, in the signed-in operator's browser.
        page.route("http://evil.example/", lambda route: route.fulfill(body="<p>hi</p>"))
        page.goto("http://evil.example/")
        assert open_socket(page, ws)["opened"] is False
        # The same socket from the site's own page opens.
        page.goto(reverse("admin:index"))
        assert open_socket(page, ws)["opened"] is True


def test_an_operator_demoted_while_watching_is_disconnected(browse, operator_user, settings):
    settings.LIVE_PERMISSION_RECHECK_S = 0.3
    with browse(operator_user) as page:
        page.goto(reverse("admin:sending_live_overview"))
        expect(page.locator("#live-connection")).to_have_text("live")
        in_thread(lambda: operator_user.groups.remove(Group.objects.get(name="Operators")))
        expect(page.locator("#live-connection")).to_have_text(
            "disconnected: you may no longer watch this page", timeout=5_000
        )
        assert page.evaluate("window.emailopsLive.closeCode") == 4403


def test_the_overview_lists_who_is_sending_and_links_to_their_live_page(
    browse, operator_user, screenshot
):
    busy = CustomerFactory(name="Lakeside University")
    Message.objects.create(
        customer=busy, subject="Fees", text_body="x", status=Message.Status.SENDING
    )
    CustomerFactory(name="Quiet College")
    with browse(operator_user) as page:
        page.goto(reverse("admin:index"))
        page.get_by_role("link", name="Sending now").click()
        rows = page.locator("#live-overview tbody tr")
        expect(rows).to_have_count(1)
        expect(rows.first).to_contain_text("Lakeside University")
        expect(page.locator("#live-connection")).to_have_text("live")
        screenshot(page, "overview")
        rows.first.get_by_role("link", name="Lakeside University").click()
        expect(page.locator("h1")).to_have_text("Live: Lakeside University")


def test_the_overview_follows_a_send_as_it_goes(browse, operator_user, sending, screenshot):
    """The overview's lines come over the websocket, a publisher batch's lines in one message
    ("lines"), and each moves its customer's row."""
    customer, _, _ = sending
    with browse(operator_user) as page:
        page.goto(reverse("admin:sending_live_overview"))
        row = page.locator(f'#live-overview tbody tr[data-customer="{customer.pk}"]')
        expect(row).to_contain_text(customer.name)
        wait_for(page, lambda: page.evaluate("window.emailopsLive.samples") > 2,
                 timeout_s=20, what="lines on the overview")  # fmt: skip
        expect(row.locator('[data-field="workers"]')).to_have_text("1 of 1", timeout=15_000)
        expect(row.locator('[data-field="rate"]')).to_have_text(re.compile(r"^[0-9.]+/s$"))
        screenshot(page, "overview-live")


def test_the_engine_admin_answers_what_happened_in_a_minute_and_hides_provider_blocks(
    browse, operator_user, screenshot
):
    minute = CustomerMinuteFactory(granted=40, sent=38)
    worker = WorkerFactory(customer=minute.customer)
    lease = LeaseFactory(
        worker=worker,
        minute_start=minute.minute_start,
        state=Lease.State.SETTLED,
        started_through=3,
        awaiting=[3],
    )
    LeaseFactory(customer=minute.customer, minute_start=minute.minute_start.replace(year=2020))
    with browse(operator_user) as page:
        page.goto(reverse("admin:sending_customerminute_changelist"))
        page.get_by_role("link", name="leases", exact=True).first.click()
        expect(page.locator("#result_list tbody tr")).to_have_count(1)
        screenshot(page, "leases-of-a-minute")
        page.get_by_role("link", name=str(lease.pk), exact=True).click()
        # Its report left recipient 3 out; no late report has spoken for it yet.
        expect(page.locator(".field-awaiting_late")).to_contain_text("1: 3")
        expect(page.locator(".field-recipients")).to_contain_text("3: 1, 2, 3")
        screenshot(page, "lease")
        page.goto(reverse("admin:sending_worker_change", args=[worker.pk]))
        expect(page.locator(".field-last_answer")).to_contain_text("send: lease 1")
        assert "SECRET-KEY" not in page.content()
        screenshot(page, "worker")
