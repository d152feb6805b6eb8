"""Late and lost answers end to end: the real worker loop against the worker API served by uvicorn,
sending to a real sandbox provider that accepts and records each message before holding its answer
(`LateAnswer`). Each test asserts at the provider (the sandbox's books) and in the database: no
recipient got two emails, every one the provider received is `sent` (with the provider's id) or
`unknown` in the database, none the provider never received is `sent`, and the minute ledger's
`sent` counts what the database says. The same against a real SMTP server (aiosmtpd) that drops the
connection after DATA.

2-second minutes and a 1 s send timeout (`fast_minutes`); every wait is bounded.
"""

import email
import threading
import time
from collections import Counter

import pytest
from aiosmtpd.controller import Controller
from django.db import connection
from django.db.models import Sum

from customers.models import SendLimit
from sending import leases, pacing
from sending.models import CustomerMinute, Lease, Recipient
from sending.providers import IDEMPOTENCY_HEADER
from sending.sandbox import LateAnswer, SandboxServer
from sending.worker import LocalContext, WorkerLoop, handler
from sending.worker import batch as worker_batch
from tests.factories import (
    API_KEY,
    CustomerFactory,
    ProviderAccountFactory,
    make_message,
    sandbox_customer,
    start_worker,
)
from tests.net import free_port

TERMINAL = {"sent", "failed", "unknown", "cancelled", "suppressed"}


def assert_db_agrees_with_the_provider(message, sandbox) -> dict[str, int]:
    """No duplicates; received ⇒ sent (same provider id) or unknown; sent ⇒ received; the
    ledger's sent is the database's. Returns the count of each status."""
    sends = sandbox.sends
    keys = Counter(s.idempotency_key for s in sends)
    assert not [k for k, n in keys.items() if n > 1], "a recipient got two emails"
    assert not any(s.duplicate for s in sends)
    received = {s.idempotency_key: s for s in sends}
    rows = list(Recipient.objects.filter(message=message))
    for row in rows:
        send = received.get(str(row.pk))
        if row.status == "sent":
            assert send is not None, f"recipient {row.pk} is sent in the database only"
            assert row.provider_message_id == send.message_id
        elif send is not None:
            assert row.status == "unknown", (row.pk, row.status, row.last_error)
    sent_rows = sum(1 for r in rows if r.status == "sent")
    ledger = CustomerMinute.objects.filter(customer=message.customer).aggregate(n=Sum("sent"))
    assert (ledger["n"] or 0) == sent_rows
    return Counter(r.status for r in rows)


def run_workers_until_done(customer, api_url, *, rounds=6, seconds=12):
    """Workers one after another (as the conductor would start them) until nothing is queued."""
    summaries = []
    for _ in range(rounds):
        if not Recipient.objects.filter(message__customer=customer, status="queued").exists():
            break
        _, event = start_worker(customer, api_url)
        summaries.append(handler(event, LocalContext(seconds)))
    return summaries


def test_answers_later_than_the_send_timeout_end_unknown_and_are_never_sent_again(api_url):
    late = LateAnswer(fraction=0.15, delay_ms=1_600)  # past the 1 s send timeout
    with SandboxServer(caps={API_KEY: 100_000}, late=late) as sandbox:
        customer = sandbox_customer(sandbox, batch_size=20, concurrency=4)
        message = make_message(customer, 60)
        summaries = run_workers_until_done(customer, api_url)
        sandbox.set_late(0)  # let the last held answers go before counting
        counts = assert_db_agrees_with_the_provider(message, sandbox)
        held = sandbox.report()["late"].get(API_KEY, 0)

    assert summaries[0]["stop"] == "done", summaries
    assert held >= 1
    # Every recipient arrived exactly once; those whose answer never came are unknown (at most
    # one per held answer), never failed and re-sent.
    assert len(sandbox.sends) == 60
    assert set(counts) <= {"sent", "unknown"}
    assert 1 <= counts["unknown"] <= held
    assert not Recipient.objects.filter(message=message, status__in=["queued", "leased"]).exists()


def test_a_slow_answer_inside_the_timeout_is_reported_late_and_recorded_sent(api_url, monkeypatch):
    """A batch whose last answers are slow is reported without them; they follow as late."""
    monkeypatch.setattr(worker_batch, "STRAGGLER_S", 0.05)
    late = LateAnswer(fraction=0.2, delay_ms=600)  # inside the 1 s send timeout
    with SandboxServer(caps={API_KEY: 100_000}, late=late) as sandbox:
        customer = sandbox_customer(sandbox, batch_size=20, concurrency=4)
        message = make_message(customer, 60)
        summaries = run_workers_until_done(customer, api_url)
        counts = assert_db_agrees_with_the_provider(message, sandbox)
        held = sandbox.report()["late"].get(API_KEY, 0)

    assert held >= 1
    assert summaries[0]["stop"] == "done", summaries
    assert counts == {"sent": 60}
    assert sum(s["sent"] for s in summaries) == 60
    assert not Lease.objects.filter(state=Lease.State.OPEN).exists()


def test_sends_answered_between_a_report_and_the_next_checkin_go_in_that_report(
    api_url, monkeypatch, frozen_server_clock
):
    """The slow scenario's 409s: a batch reported with its sends still out, and those answered
    before the next check-in left, sent them as `late` beside the lease's own report. (The
    server's clock stands early in a minute: a grant late in a 2-second minute could have closed
    its window before arriving, and the batch would go back unsent.)"""
    monkeypatch.setattr(worker_batch, "STRAGGLER_S", 0.05)
    late = LateAnswer(fraction=1.0, delay_ms=300)  # every answer held, inside the 1 s timeout
    with SandboxServer(caps={API_KEY: 100_000}, late=late) as sandbox:
        customer = sandbox_customer(sandbox, batch_size=5, concurrency=5)
        message = make_message(customer, 5)
        _, event = start_worker(customer, api_url)
        loop = WorkerLoop(event, LocalContext(10))
        try:
            answer = loop.checkin()
            assert answer.decision == "send", answer.body
            loop.send_batch(answer.batch, answer.window)
            assert loop.stragglers, "the report was written with its sends still out"
            time.sleep(0.6)  # every held answer comes back before the next check-in
            final = loop.checkin(final=True)
        finally:
            loop.close()
        counts = assert_db_agrees_with_the_provider(message, sandbox)

    assert final.decision == "stop"
    assert not loop.stragglers
    assert counts == {"sent": 5}
    assert loop.summary.as_dict()["sent"] == 5 and loop.summary.unknown == 0


@pytest.fixture
def reclaimer():
    """The conductor's reclaim, every 50 ms, on a connection of its own."""
    stop = threading.Event()
    reclaimed = []

    def run():
        try:
            while not stop.wait(0.05):
                reclaimed.append(leases.reclaim_overdue())
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield reclaimed
    stop.set()
    thread.join(5)


def test_a_report_that_comes_after_its_lease_was_reclaimed_still_counts(
    api_url, monkeypatch, reclaimer
):
    """The issue's run: reports came after their leases were reclaimed and were refused, so the
    database said nothing was sent while everything had arrived. Here the worker holds each batch
    until its last answer (as before), and every answer comes after its lease is overdue: a new
    worker's start window is its batch at the assumed rate (4 sends at 40/s: 200 ms, no slack),
    the API presumes it lost 50 ms later, and the provider answers each send after 700 ms. So each
    worker's first lease is reclaimed before its report comes, whatever the timing."""
    monkeypatch.setattr(worker_batch, "STRAGGLER_S", 5.0)
    monkeypatch.setattr(worker_batch, "REPORT_SLACK_S", 5.0)
    monkeypatch.setattr(pacing, "STOP_SLACK_MS", 0)
    monkeypatch.setattr(pacing, "OVERDUE_SLACK_MS", 50)
    late = LateAnswer(fraction=1.0, delay_ms=700)
    with SandboxServer(caps={API_KEY: 100_000}, late=late) as sandbox:
        customer = sandbox_customer(sandbox, batch_size=4, concurrency=4)
        message = make_message(customer, 16)
        summaries = run_workers_until_done(customer, api_url, rounds=12)
        counts = assert_db_agrees_with_the_provider(message, sandbox)

    assert sum(reclaimer) >= 1, "no lease was reclaimed: the test did not test anything"
    assert any(s["stop"] == "worker is lost" for s in summaries), summaries
    # Every answer came within the send timeout, so the late reports leave nothing in doubt.
    assert counts == {"sent": 16}
    assert len(sandbox.sends) == 16
    assert Lease.objects.filter(state=Lease.State.EXPIRED).exists()


class DroppingAfterData:
    """An SMTP server that takes every message and, for every `every`-th one, drops the
    connection after DATA instead of answering: the message is in, the client never hears so."""

    def __init__(self, every: int):
        self.every = every
        self.received: list[str] = []  # idempotency keys, in arrival order
        self.dropped: list[str] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content or envelope.content)
        key = message[IDEMPOTENCY_HEADER]
        with self.lock:
            self.received.append(key)
            drop = len(self.received) % self.every == 0
            if drop:
                self.dropped.append(key)
        if drop:
            server.transport.close()
            return "421 never heard"
        return "250 OK"


def test_an_smtp_connection_lost_after_data_is_unknown_and_never_sent_again(api_url):
    smtp = DroppingAfterData(every=7)
    controller = Controller(smtp, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        account = ProviderAccountFactory(
            kind="smtp",
            settings={"host": "127.0.0.1", "port": controller.port},
            per_minute_cap=1_000,
        )
        customer = CustomerFactory(provider_account=account)
        SendLimit.objects.filter(customer=customer).update(
            per_minute=1_000, batch_size=20, concurrency=3
        )
        message = make_message(customer, 40)
        summaries = run_workers_until_done(customer, api_url)
    finally:
        controller.stop()

    assert summaries[0]["stop"] == "done", summaries
    assert smtp.dropped, "no connection was dropped: the test did not test anything"
    keys = Counter(smtp.received)
    assert [k for k, n in keys.items() if n > 1] == [], "a recipient got two emails"
    rows = {str(r.pk): r for r in Recipient.objects.filter(message=message)}
    assert sorted(keys) == sorted(rows)  # everyone arrived, once
    for key in smtp.dropped:
        assert rows[key].status == "unknown", (key, rows[key].status, rows[key].last_error)
        assert "connection" in rows[key].last_error.lower()
    assert {r.status for k, r in rows.items() if k not in smtp.dropped} == {"sent"}
    ledger = CustomerMinute.objects.filter(customer=customer).aggregate(n=Sum("sent"))
    assert ledger["n"] == len(rows) - len(smtp.dropped)
