"""A report is the truth, whenever it comes: late reports through the check-in service.

A worker's report can come after its lease was settled: reclaimed as overdue (the worker was slow,
not lost), or settled by the worker's own earlier report that left a slow send out. What it says
is recorded over the `unknown` its recipients were left in, counted in the lease's own minute,
and never re-queues a recipient that was leased again since.
"""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from sending import checkin, leases, tokens, wire
from sending.clock import Clock, datetime_to_ms, ms_to_datetime
from sending.models import CustomerMinute, Lease, Message, Recipient
from sending.wire import parse_checkin, parse_progress
from tests.factories import T0, WINDOW_MS, call, make_customer, make_message, statuses

# A check-in that carries a late report and is told to stop: the same at any report size.
# The pacing standing (`accounts.standing`) is read since issue 12; the lease's `awaiting` list is
# written since late unknowns give the next minute back its charge.
LATE_CHECKIN_QUERIES = 11


@pytest.fixture
def customer(db):
    return make_customer()


def progress(answer, worker, started_through):
    leases.record_progress(
        claims=tokens.verify(answer["token"]),
        request=parse_progress(
            {
                "worker_id": worker.pk,
                "lease_id": answer["batch"]["lease_id"],
                "started_through": started_through,
            }
        ),
    )


def reclaim(lease_id):
    lease = Lease.objects.get(pk=lease_id)
    assert leases.reclaim_overdue(clock=Clock(datetime_to_ms(lease.overdue_at))) == 1
    return lease


def reclaimed_batch(customer, n):
    """A worker granted `n` recipients, all started (its mark), then reclaimed as overdue."""
    message = make_message(customer, n)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    progress(first, worker, n)
    lease = reclaim(first["batch"]["lease_id"])
    ids = [r["id"] for r in first["batch"]["recipients"]]
    return message, worker, first, ids, lease


def sent(i, done_ms=100):
    return {"id": i, "status": "sent", "provider_id": f"p{i}", "done_ms": done_ms}


def minute_of(lease):
    return CustomerMinute.objects.get(customer=lease.customer, minute_start=lease.minute_start)


def test_a_report_for_a_reclaimed_lease_records_what_it_knows(customer):
    message = make_message(customer, 50)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    lease_id = first["batch"]["lease_id"]
    ids = [r["id"] for r in first["batch"]["recipients"]]
    progress(first, worker, 20)
    lease = reclaim(lease_id)
    assert {statuses(message)[i] for i in ids[:20]} == {"unknown"}
    before = minute_of(lease)
    assert (before.granted, before.refunded, before.sent) == (50, 30, 0)

    report = {
        "lease_id": lease_id,
        "elapsed_ms": 9_000,
        "results": [
            *(sent(i) for i in ids[:15]),
            {"id": ids[15], "status": "failed", "permanent": True, "error": "550", "done_ms": 9},
            {"id": ids[16], "status": "unknown", "error": "read timeout"},
            {"id": ids[17], "status": "not_started"},
            # ids[18], ids[19]: left out, still in doubt.
            # Past the mark nothing was started (progress was refused); a claim otherwise is
            # not believed: those recipients were queued again at the reclaim.
            sent(ids[20]),
        ],
    }
    answer = call(worker, first["token"], 2, report, at=T0 + 9_000)

    # The worker was presumed lost: it is told to stop, but what it reported counts.
    assert (answer["decision"], answer["reason"]) == ("stop", "worker is lost")
    now = statuses(message)
    assert {now[i] for i in ids[:15]} == {"sent"}
    assert (now[ids[15]], now[ids[16]], now[ids[17]]) == ("failed", "unknown", "queued")
    assert {now[ids[18]], now[ids[19]]} == {"unknown"}
    assert {now[i] for i in ids[20:]} == {"queued"}
    row = Recipient.objects.get(pk=ids[0])
    assert (row.provider_message_id, row.attempts) == (f"p{ids[0]}", 1)
    assert row.sent_at is not None
    # Counted in the minute it was charged to; the one never started is refunded there.
    after = minute_of(lease)
    assert (after.granted, after.refunded, after.sent, after.failed) == (50, 31, 15, 1)
    assert Lease.objects.get(pk=lease_id).state == "expired"


def test_a_repeated_late_report_changes_nothing_more(customer):
    message, worker, first, ids, lease = reclaimed_batch(customer, 10)
    report = {"lease_id": lease.pk, "elapsed_ms": 1, "results": [sent(i) for i in ids[:4]]}
    second = call(worker, first["token"], 2, report, at=T0 + 9_000)
    call(worker, second["token"], 3, late=[report], at=T0 + 9_100)
    assert minute_of(lease).sent == 4
    assert sorted(statuses(message).values()) == ["sent"] * 4 + ["unknown"] * 6


def test_a_partial_report_then_the_rest_as_late(customer, settings):
    """A worker whose last send is still out reports what it has, sends its next batch, and
    reports the straggler with its next check-in."""
    settings.SEND_TIMEOUT_MS = WINDOW_MS - 1_000  # every lease may cross into the next minute
    make_message(customer, 120)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    lease_id = first["batch"]["lease_id"]
    ids = [r["id"] for r in first["batch"]["recipients"]]
    progress(first, worker, 50)
    partial = {"lease_id": lease_id, "elapsed_ms": 500, "results": [sent(i) for i in ids[:49]]}
    second = call(worker, first["token"], 2, partial, at=T0 + 600)
    assert Recipient.objects.get(pk=ids[49]).status == "unknown"
    assert second["decision"] == "send"
    lease = Lease.objects.get(pk=lease_id)
    assert minute_of(lease).sent == 49
    # Left out, it may have crossed: charged to the next minute too, for now.
    following = ms_to_datetime(datetime_to_ms(lease.minute_start) + WINDOW_MS)
    assert CustomerMinute.objects.get(minute_start=following).carried_in == 1

    rest = {"lease_id": lease_id, "elapsed_ms": 4_000, "results": [sent(ids[49], 4_100)]}
    ids2 = [r["id"] for r in second["batch"]["recipients"]]
    report2 = {
        "lease_id": second["batch"]["lease_id"],
        "elapsed_ms": 500,
        "results": [sent(i) for i in ids2],
    }
    call(worker, second["token"], 3, report2, at=T0 + 1_200, late=[rest])
    row = Recipient.objects.get(pk=ids[49])
    assert (row.status, row.provider_message_id) == ("sent", f"p{ids[49]}")
    assert minute_of(lease).sent == 100
    # Answered well before the minute's end: it did not cross, and the next minute gets it back.
    assert CustomerMinute.objects.get(minute_start=following).carried_in == 0


def partly_reported(customer, settings, report_for):
    """A lease of 5 recipients that may cross, of which the worker reported what
    `report_for(ids)` says; returns the worker, its answer, the ids, the lease and the minute
    after the lease's."""
    settings.SEND_TIMEOUT_MS = WINDOW_MS - 1_000  # every lease may cross into the next minute
    make_message(customer, 5)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    lease_id = first["batch"]["lease_id"]
    ids = [r["id"] for r in first["batch"]["recipients"]]
    progress(first, worker, 5)
    partial = {"lease_id": lease_id, "elapsed_ms": 5, "results": report_for(ids)}
    second = call(worker, first["token"], 2, partial, at=T0 + 600)
    lease = Lease.objects.get(pk=lease_id)
    following = ms_to_datetime(datetime_to_ms(lease.minute_start) + WINDOW_MS)
    return worker, second, ids, lease, following


def test_a_late_answer_inside_the_guard_band_stays_charged_to_the_next_minute(customer, settings):
    worker, second, ids, lease, following = partly_reported(
        customer, settings, lambda ids: [sent(i) for i in ids[:3]]
    )
    last_safe = lease.minute_ends_in_ms - lease.guard_ms
    late = {
        "lease_id": lease.pk,
        "elapsed_ms": 1,
        "results": [sent(ids[3], last_safe + 1), {"id": ids[4], "status": "not_started"}],
    }
    call(worker, second["token"], 3, late=[late], at=T0 + 700)
    # The one answered inside the guard band may have arrived next minute; the other never went.
    assert CustomerMinute.objects.get(minute_start=following).carried_in == 1
    assert minute_of(lease).refunded == 1


def test_an_unanswered_send_whose_timeout_ran_out_in_time_gives_the_next_minute_back_once(
    customer, settings
):
    """Left out of its report (still out), a send is charged to the next minute too. When its
    timeout runs out before the minute's last safe moment it cannot have crossed: the late
    `unknown` gives that charge back, once however often it is repeated."""
    worker, second, ids, lease, following = partly_reported(
        customer, settings, lambda ids: [sent(i) for i in ids[:4]]
    )
    assert CustomerMinute.objects.get(minute_start=following).carried_in == 1
    timed_out = {"id": ids[4], "status": "unknown", "error": "read timed out", "done_ms": 4_100}
    late = {"lease_id": lease.pk, "elapsed_ms": 1, "results": [timed_out]}
    third = call(worker, second["token"], 3, late=[late], at=T0 + 4_700)
    assert CustomerMinute.objects.get(minute_start=following).carried_in == 0
    row = Recipient.objects.get(pk=ids[4])
    # Still in doubt (never re-sent), with the attempt and what the worker saw.
    assert (row.status, row.attempts, row.last_error) == ("unknown", 1, "read timed out")
    assert (minute_of(lease).sent, minute_of(lease).refunded) == (4, 0)

    # The same late word again (a worker bug, or a replay under another seq): nothing moves.
    fourth = call(worker, third["token"], 4, late=[late], at=T0 + 4_800)
    assert fourth["decision"] in ("wait", "stop", "send")
    assert CustomerMinute.objects.get(minute_start=following).carried_in == 0
    assert Recipient.objects.get(pk=ids[4]).attempts == 1


def test_a_late_word_never_revises_what_the_report_said(customer, settings):
    """The report said `unknown`, answered in the guard band (charged to the next minute): a late
    report about the same recipient is not heard, and the charge stays."""

    def report_for(ids):
        lease = Lease.objects.get()  # the only one
        in_band = lease.minute_ends_in_ms - lease.guard_ms + 1
        return [
            *(sent(i) for i in ids[:4]),
            {"id": ids[4], "status": "unknown", "error": "read timed out", "done_ms": in_band},
        ]

    worker, second, ids, lease, following = partly_reported(customer, settings, report_for)
    assert CustomerMinute.objects.get(minute_start=following).carried_in == 1
    late = {"lease_id": lease.pk, "elapsed_ms": 1, "results": [sent(ids[4], 100)]}
    call(worker, second["token"], 3, late=[late], at=T0 + 700)
    assert CustomerMinute.objects.get(minute_start=following).carried_in == 1
    assert Recipient.objects.get(pk=ids[4]).status == "unknown"
    assert minute_of(lease).sent == 4


def test_sends_in_doubt_in_a_lease_that_cannot_cross_charge_only_its_own_minute(customer):
    """Its last start plus the send timeout ends inside the minute: left out of the report, a send
    may be anywhere but the next minute, so nothing is charged there — nor taken back from
    there when its late report comes (which once drove carried_in below zero: a 500)."""
    make_message(customer, 5)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    lease_id = first["batch"]["lease_id"]
    ids = [r["id"] for r in first["batch"]["recipients"]]
    progress(first, worker, 5)
    lease = Lease.objects.get(pk=lease_id)
    assert not lease.may_cross
    partial = {"lease_id": lease_id, "elapsed_ms": 5, "results": [sent(i) for i in ids[:3]]}
    second = call(worker, first["token"], 2, partial, at=T0 + 600)
    following = ms_to_datetime(datetime_to_ms(lease.minute_start) + WINDOW_MS)
    CustomerMinute.objects.create(customer=customer, minute_start=following, cap=600)
    late = {"lease_id": lease_id, "elapsed_ms": 1, "results": [sent(ids[3]), sent(ids[4])]}
    third = call(worker, second["token"], 3, late=[late], at=T0 + 700)

    assert third["decision"] in ("wait", "stop", "send")
    assert CustomerMinute.objects.get(minute_start=following).carried_in == 0
    assert minute_of(lease).sent == 5


def test_a_recipient_leased_again_since_is_not_touched(customer):
    """An operator's "retry unknown" queued it again and another worker has it: the old worker's
    word no longer decides (it would otherwise be queued a second time, and sent twice)."""
    message, worker, first, ids, lease = reclaimed_batch(customer, 5)
    Recipient.objects.filter(pk=ids[0]).update(status="queued")
    other, other_token = checkin.worker_start(customer_id=customer.pk)
    granted = call(other, other_token, 1, at=T0 + 9_000)
    assert [r["id"] for r in granted["batch"]["recipients"]] == [ids[0]]
    call(other, granted["token"], 2, all_sent(granted), at=T0 + 9_100)

    late = {
        "lease_id": lease.pk,
        "elapsed_ms": 1,
        "results": [{"id": i, "status": "not_started"} for i in ids],
    }
    call(worker, first["token"], 2, late, at=T0 + 9_200)
    now = statuses(message)
    assert now[ids[0]] == "sent"  # the other lease's word
    assert {now[i] for i in ids[1:]} == {"queued"}
    assert minute_of(lease).refunded == 4


def all_sent(answer):
    return {
        "lease_id": answer["batch"]["lease_id"],
        "elapsed_ms": 1,
        "results": [sent(r["id"]) for r in answer["batch"]["recipients"]],
    }


def test_a_late_not_started_reopens_a_completed_message(customer):
    message, worker, first, ids, _ = reclaimed_batch(customer, 3)
    Message.objects.filter(pk=message.pk).update(status="completed")
    late = {
        "lease_id": first["batch"]["lease_id"],
        "elapsed_ms": 1,
        "results": [sent(ids[0]), {"id": ids[1], "status": "not_started"}],
    }
    call(worker, first["token"], 2, late, at=T0 + 9_000)
    message.refresh_from_db()
    assert (message.status, message.completed_at) == ("sending", None)
    assert statuses(message) == {ids[0]: "sent", ids[1]: "queued", ids[2]: "unknown"}


def test_a_late_report_for_another_workers_lease_is_refused_and_changes_nothing(customer):
    message, worker, first, ids, lease = reclaimed_batch(customer, 10)
    intruder, intruder_token = checkin.worker_start(customer_id=customer.pk)
    late = {"lease_id": lease.pk, "elapsed_ms": 1, "results": [sent(ids[0])]}
    with pytest.raises(wire.Conflict, match="not this worker's"):
        call(intruder, intruder_token, 1, late=[late], at=T0 + 9_000)
    with pytest.raises(wire.Conflict, match=f"not in lease {lease.pk}"):
        bad = {**late, "results": [sent(ids[0]), sent(10**9)]}
        call(worker, first["token"], 2, late=[bad], at=T0 + 9_000)
    assert set(statuses(message).values()) == {"unknown"}
    assert minute_of(lease).sent == 0


def test_an_open_lease_cannot_be_reported_as_late_nor_one_lease_twice(customer):
    make_message(customer, 10)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    late = {"lease_id": first["batch"]["lease_id"], "elapsed_ms": 1, "results": []}
    with pytest.raises(wire.Conflict, match="is open"):
        call(worker, first["token"], 2, all_sent(first), late=[late], at=T0 + 500)
    with pytest.raises(wire.Conflict, match="one report per lease"):
        call(worker, first["token"], 2, all_sent(first), late=[late, late], at=T0 + 500)
    assert Recipient.objects.filter(status="leased").count() == 10


@pytest.mark.parametrize(
    ("late", "problem"),
    [
        ({}, "late: a list"),
        ([None], "late[0]: must be an object"),
        ([{"lease_id": 0, "elapsed_ms": 1, "results": []}], "late[0].lease_id: must be ≥ 1"),
        ([{"lease_id": 1, "elapsed_ms": 1, "results": [{"id": 1}]}], "late[0].results[0].status"),
        ([{"lease_id": i, "elapsed_ms": 1, "results": []} for i in range(1, 22)], "at most 20"),
    ],
)
def test_malformed_late_reports_are_400_naming_the_field(late, problem):
    with pytest.raises(wire.BadRequest) as caught:
        parse_checkin({"worker_id": 1, "seq": 1, "late": late})
    assert any(problem in p for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("size", [10, 500])
def test_a_late_report_is_recorded_with_as_many_queries_for_500_as_for_10(customer, size):
    from customers.models import SendLimit

    SendLimit.objects.filter(customer=customer).update(per_minute=6_000, batch_size=size)
    make_message(customer, size)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    progress(first, worker, size)
    reclaim(first["batch"]["lease_id"])
    report = all_sent(first)
    with CaptureQueriesContext(connection) as queries:
        call(worker, first["token"], 2, report, at=T0 + 9_000)
    assert Recipient.objects.filter(status="sent").count() == size
    assert len(queries) == LATE_CHECKIN_QUERIES, [q["sql"][:120] for q in queries]


def test_retry_unknown_is_refused_for_a_cancelled_message_and_without_permission(customer):
    from django.core.exceptions import PermissionDenied, ValidationError

    from sending import services
    from tests.factories import UserFactory

    message, *_ = reclaimed_batch(customer, 3)
    with pytest.raises(PermissionDenied):
        services.message_retry_unknown(message_id=message.pk, user=UserFactory())
    Message.objects.filter(pk=message.pk).update(status="cancelled")
    with pytest.raises(ValidationError, match="cancelled: cannot retry"):
        services.message_retry_unknown(message_id=message.pk)
    assert set(statuses(message).values()) == {"unknown"}
