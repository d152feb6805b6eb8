"""Many workers checking in at once, on PostgreSQL: the budget and the leases hold."""

import threading
from collections import Counter

import pytest
from django.db import connection, connections

from customers.models import SendLimit
from sending import checkin, tokens
from sending.checkin import Clock
from sending.models import CustomerMinute, Recipient
from sending.protocol import parse_checkin
from tests.sending.support import T0, make_customer, make_message, report_all_sent

THREADS = 8


@pytest.fixture
def busy_customer(postgres, transactional_db, monkeypatch):
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    customer = make_customer("busy-u", per_minute=3_000, batch_size=40, max_workers=THREADS)
    # One call in flight per worker, so the pacing wants every worker it can get.
    SendLimit.objects.filter(customer=customer).update(concurrency=1)
    make_message(customer, 5_000)
    return customer


def test_eight_workers_at_once_never_share_a_recipient_or_overspend_the_minute(busy_customer):
    workers = [checkin.worker_start(customer_id=busy_customer.pk) for _ in range(THREADS)]
    granted: list[list[int]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def run(index: int) -> None:
        worker, token = workers[index]
        report, seq = None, 0
        try:
            start.wait(timeout=30)
            for step in range(200):
                seq += 1
                body = {"worker_id": worker.pk, "seq": seq, "request_id": "r", "report": report}
                answer = checkin.checkin(
                    claims=tokens.verify(token),
                    request=parse_checkin(body),
                    clock=Clock(T0 + step),  # all within one minute
                )
                token = answer["token"]
                if answer["decision"] != "send":
                    return
                granted[index] += [r["id"] for r in answer["batch"]["recipients"]]
                report = report_all_sent(answer)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)

    everyone = [rid for ids in granted for rid in ids]
    twice = [rid for rid, n in Counter(everyone).items() if n > 1]
    assert twice == []
    assert sum(1 for ids in granted if ids) == THREADS  # they really did work side by side
    minute = CustomerMinute.objects.get(customer=busy_customer)
    assert len(everyone) == minute.granted == 3_000
    # Each worker's last batch is still out (leased); all the others were recorded as sent.
    assert Recipient.objects.filter(status__in=["sent", "leased"]).count() == 3_000


def test_a_checkin_waits_for_the_customer_lock_so_budgets_are_never_read_half_updated(
    busy_customer,
):
    """Deterministic companion to the race above: while another transaction holds the customer's
    SendLimit row, a check-in cannot decide (it blocks), so no two check-ins of one customer ever
    grant from the same view of the minute."""
    from django.db import transaction

    worker, token = checkin.worker_start(customer_id=busy_customer.pk)
    holding = threading.Event()
    release = threading.Event()

    def hold_the_lock():
        try:
            with transaction.atomic():
                SendLimit.objects.select_for_update().get(customer=busy_customer)
                holding.set()
                release.wait(timeout=30)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    assert holding.wait(timeout=10)
    answers = []

    def check_in():
        try:
            body = {"worker_id": worker.pk, "seq": 1, "request_id": "r", "report": None}
            answers.append(
                checkin.checkin(
                    claims=tokens.verify(token), request=parse_checkin(body), clock=Clock(T0)
                )
            )
        finally:
            connections.close_all()

    checker = threading.Thread(target=check_in)
    checker.start()
    checker.join(timeout=1.5)
    assert checker.is_alive() and answers == []  # blocked behind the lock
    release.set()
    holder.join(timeout=10)
    checker.join(timeout=10)
    assert answers and answers[0]["decision"] == "send"
