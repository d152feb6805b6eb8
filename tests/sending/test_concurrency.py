"""Many workers checking in at once, on PostgreSQL: the budget and the leases hold."""

import threading
from collections import Counter

import pytest
from django.db import connection, connections

from customers.models import SendLimit
from sending import checkin, tokens
from sending.clock import Clock, ms_to_datetime
from sending.models import CustomerMinute, Recipient
from sending.wire import parse_checkin
from tests.factories import T0, make_customer, make_message, report_all_sent

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


class _CustomerLockHolder:
    """Another transaction holding the customer's SendLimit row (what a check-in deciding for
    the customer holds), optionally charging the current minute before it lets go."""

    def __init__(self, customer, *, charge: int | None = None):
        self.customer = customer
        self.charge = charge
        self.holding = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        from django.db import transaction

        try:
            with transaction.atomic():
                SendLimit.objects.select_for_update().get(customer=self.customer)
                if self.charge is not None:
                    CustomerMinute.objects.create(
                        customer=self.customer,
                        minute_start=ms_to_datetime(T0 - T0 % 60_000),
                        cap=3_000,
                        granted=self.charge,
                    )
                self.holding.set()
                self.release.wait(timeout=30)
        finally:
            connections.close_all()

    def __enter__(self):
        self.thread.start()
        assert self.holding.wait(timeout=10)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(timeout=10)


def _check_in_thread(worker, token, answers, errors):
    def run():
        try:
            body = {"worker_id": worker.pk, "seq": 1, "request_id": "r", "report": None}
            answers.append(
                checkin.checkin(
                    claims=tokens.verify(token), request=parse_checkin(body), clock=Clock(T0)
                )
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_until_a_backend_waits_for_a_lock(*, timeout_s=10.0):
    import time

    deadline = time.monotonic() + timeout_s
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0]:
                return
            time.sleep(0.02)
    raise AssertionError("no check-in came to wait for the customer's lock")


def _locked_rows(message_id, first_n):
    """Of the first `first_n` queued-looking recipients, those another transaction has locked."""
    from django.db import transaction

    ids = list(
        Recipient.objects.filter(message_id=message_id).order_by("id").values_list("id", flat=True)
    )[:first_n]
    with transaction.atomic():
        free = set(
            Recipient.objects.select_for_update(skip_locked=True)
            .filter(id__in=ids)
            .values_list("id", flat=True)
        )
    return [i for i in ids if i not in free]


def test_a_checkin_waits_for_the_customer_lock_so_budgets_are_never_read_half_updated(
    busy_customer,
):
    """Deterministic companion to the race above: while another transaction holds the customer's
    SendLimit row, a check-in cannot decide (it blocks), so no two check-ins of one customer ever
    grant from the same view of the minute."""
    worker, token = checkin.worker_start(customer_id=busy_customer.pk)
    answers, errors = [], []
    with _CustomerLockHolder(busy_customer):
        checker = _check_in_thread(worker, token, answers, errors)
        checker.join(timeout=1.5)
        assert checker.is_alive() and answers == []  # blocked behind the lock
    checker.join(timeout=10)
    assert not errors, errors
    assert answers and answers[0]["decision"] == "send"


def test_a_checkin_claims_its_batch_before_it_waits_for_the_customer_lock(busy_customer):
    """The claim is out of the time the customer's lock is held: a check-in blocked on the lock
    already holds its batch, and is granted exactly that batch once the lock is free."""
    message = busy_customer.messages.get()
    worker, token = checkin.worker_start(customer_id=busy_customer.pk)
    answers, errors = [], []
    with _CustomerLockHolder(busy_customer):
        checker = _check_in_thread(worker, token, answers, errors)
        _wait_until_a_backend_waits_for_a_lock()
        first = list(message.recipients.order_by("id").values_list("id", flat=True)[:41])
        assert _locked_rows(message.pk, 41) == first[:40]  # batch_size 40, claimed and held
        assert answers == []
    checker.join(timeout=10)
    assert not errors, errors
    assert [r["id"] for r in answers[0]["batch"]["recipients"]] == first[:40]


@pytest.mark.parametrize(("charged", "granted"), [(3_000 - 15, 15), (3_000, 0)])
def test_what_the_locked_decision_does_not_grant_goes_back_to_the_queue(
    busy_customer, charged, granted
):
    """The claim ahead is sized on an unlocked read. Here the minute's budget is used up (or all
    but 15) by a transaction that commits while the check-in waits for the lock: the decision
    under the lock grants what is left, and the rest of the claim is queued again, first in line
    for the next claim."""
    message = busy_customer.messages.get()
    first = list(message.recipients.order_by("id").values_list("id", flat=True)[:80])
    worker, token = checkin.worker_start(customer_id=busy_customer.pk)
    answers, errors = [], []
    with _CustomerLockHolder(busy_customer, charge=charged):
        checker = _check_in_thread(worker, token, answers, errors)
        _wait_until_a_backend_waits_for_a_lock()
        assert _locked_rows(message.pk, 41) == first[:40]
    checker.join(timeout=10)
    assert not errors, errors

    (answer,) = answers
    if granted:
        assert [r["id"] for r in answer["batch"]["recipients"]] == first[:granted]
    else:
        assert answer["decision"] == "wait"
    assert set(
        Recipient.objects.filter(status=Recipient.Status.LEASED).values_list("id", flat=True)
    ) == set(first[:granted])
    assert Recipient.objects.filter(status=Recipient.Status.QUEUED).count() == 5_000 - granted
    assert CustomerMinute.objects.get(customer=busy_customer).granted == charged + granted

    # The next minute, another worker is granted the returned recipients first.
    other, other_token = checkin.worker_start(customer_id=busy_customer.pk)
    body = {"worker_id": other.pk, "seq": 1, "request_id": "r2", "report": None}
    answer = checkin.checkin(
        claims=tokens.verify(other_token), request=parse_checkin(body), clock=Clock(T0 + 60_000)
    )
    assert [r["id"] for r in answer["batch"]["recipients"]] == first[granted : granted + 40]


def test_a_cancel_while_a_checkin_holds_its_claim_waits_for_it_without_deadlock(busy_customer):
    """An operator's cancel locks the message and cancels its queued recipients, so it waits for
    the rows a check-in has claimed. The check-in must not wait for the message in turn: it moves
    the message's cursor only after its commit. Both finish, and the batch out with the worker is
    not cancelled under it."""
    from sending import services

    message = busy_customer.messages.get()
    first = list(message.recipients.order_by("id").values_list("id", flat=True)[:40])
    worker, token = checkin.worker_start(customer_id=busy_customer.pk)
    answers, errors, cancelled = [], [], []

    def cancel():
        try:
            cancelled.append(services.message_cancel(message_id=message.pk))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    with _CustomerLockHolder(busy_customer):
        checker = _check_in_thread(worker, token, answers, errors)
        _wait_until_a_backend_waits_for_a_lock()
        canceller = threading.Thread(target=cancel)
        canceller.start()
        canceller.join(timeout=1.0)
        assert canceller.is_alive()  # waiting for the claimed rows
    checker.join(timeout=15)
    canceller.join(timeout=15)
    assert not errors, errors
    assert [r["id"] for r in answers[0]["batch"]["recipients"]] == first
    assert cancelled == [5_000 - 40]
    assert set(
        Recipient.objects.filter(status=Recipient.Status.LEASED).values_list("id", flat=True)
    ) == set(first)
