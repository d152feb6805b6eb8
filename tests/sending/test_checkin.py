"""Check-ins through the service, and through the HTTP views as production serves them (uvicorn,
emailops.asgi)."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from django.core import signing
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from customers.models import SendLimit, Suppression
from sending import checkin, leases, pacing, throttle, tokens, wire
from sending.clock import Clock, datetime_to_ms, ms_to_datetime
from sending.models import CustomerMinute, Lease, Recipient, Worker
from sending.wire import parse_checkin, parse_progress
from tests.factories import T0, WINDOW_MS, call, make_customer, make_message, report_all_sent

# A check-in that reports a batch and is granted the next, in a minute that has its row: the same
# at any batch size (the test below runs it at 10 and 500). Two of them read the customer's
# provider account and what refusals taught (sending/accounts.py), before and under the lock.
QUERIES_PER_CHECKIN = 21


@pytest.fixture
def customer(db):
    return make_customer()


def test_first_checkin_grants_a_batch_inside_the_guarded_minute(customer):
    message = make_message(customer, 120)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    answer = call(worker, token, 1)
    assert answer["decision"] == "send"
    batch = answer["batch"]
    assert len(batch["recipients"]) == 50
    assert batch["minute_ends_in_ms"] == WINDOW_MS - 1_500
    assert 0 == batch["start_in_ms"] < batch["stop_starting_in_ms"] <= WINDOW_MS - 1_500 - 250
    assert batch["answer_by_in_ms"] == WINDOW_MS - 1_500 - 250
    assert batch["messages"][str(message.pk)]["subject"] == "Hello {{ first_name }}"
    assert batch["messages"][str(message.pk)]["from_email"] == "news@state-u.edu"
    assert batch["recipients"][0]["merge"] == {"first_name": 0}
    assert Recipient.objects.filter(status="leased").count() == 50
    minute = CustomerMinute.objects.get(customer=customer)
    assert (minute.granted, minute.cap) == (50, 600)
    assert tokens.verify(answer["token"]).worker_id == worker.pk
    worker.refresh_from_db()
    assert (worker.state, worker.last_seq, worker.request_id) == ("running", 1, "inv-1")


def test_a_worker_whose_provider_answers_slowly_gets_a_window_that_ends_earlier(customer):
    make_message(customer, 120)
    last_safe = T0 - 1_500 + WINDOW_MS - 250  # the minute's end less its guard
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1, at=last_safe - 3_000, answer_ms=2_500)
    assert first["decision"] == "send"
    assert first["batch"]["stop_starting_in_ms"] <= 500
    # With less left than its answers take, it is told to come back when the next minute opens.
    report = report_all_sent(first)
    answer = call(worker, first["token"], 2, report, at=last_safe - 2_000, answer_ms=2_500)
    assert (answer["decision"], answer["wait_ms"]) == ("wait", 2_250)


def test_a_report_is_recorded_and_the_next_batch_granted(customer):
    make_message(customer, 120)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    second = call(worker, first["token"], 2, report_all_sent(first), at=T0 + 600)
    assert second["decision"] == "send"
    sent_ids = [r["id"] for r in first["batch"]["recipients"]]
    rows = Recipient.objects.filter(id__in=sent_ids)
    assert {r.status for r in rows} == {"sent"}
    assert all(r.provider_message_id == f"p{r.id}" for r in rows)
    assert not set(sent_ids) & {r["id"] for r in second["batch"]["recipients"]}
    assert Lease.objects.get(pk=first["batch"]["lease_id"]).state == "settled"
    minute = CustomerMinute.objects.get(customer=customer)
    assert (minute.granted, minute.sent, minute.refunded, minute.carried_in) == (100, 50, 0, 0)
    worker.refresh_from_db()
    assert worker.rate_per_s == pytest.approx(100.0)  # 50 sends in 500 ms


def test_not_started_and_throttled_are_refunded_and_queued_again(customer):
    make_message(customer, 10)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    ids = [r["id"] for r in first["batch"]["recipients"]]
    report = {
        "lease_id": first["batch"]["lease_id"],
        "elapsed_ms": 100,
        "results": [
            {"id": ids[0], "status": "sent", "provider_id": "x", "done_ms": 50},
            {"id": ids[1], "status": "throttled", "error": "429 Too Many Requests"},
            *({"id": i, "status": "not_started"} for i in ids[2:]),
        ],
    }
    answer = call(worker, first["token"], 2, report, at=T0 + 200)
    minute = CustomerMinute.objects.get(customer=customer)
    assert (minute.refunded, minute.throttled, minute.sent) == (9, 1, 1)
    assert Recipient.objects.filter(status="queued").count() == 9
    # A refusal mid-minute backs off (1 s, no Retry-After given, plus jitter) instead of giving up
    # the minute (tests/sending/test_checkin_throttle.py has the rules).
    assert answer["decision"] == "wait"
    assert 1_000 <= answer["wait_ms"] < 1_000 + throttle.JITTER_MS


def test_late_answers_are_carried_into_the_next_minute(customer):
    make_message(customer, 10)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    late = first["batch"]["minute_ends_in_ms"] - 100  # inside the trailing guard band
    call(worker, first["token"], 2, report_all_sent(first, done_ms=late), at=T0 + WINDOW_MS)
    following = CustomerMinute.objects.get(
        customer=customer, minute_start=ms_to_datetime(T0 - 1_500 + WINDOW_MS)
    )
    assert following.carried_in == 10


def test_a_repeated_seq_replays_the_stored_answer_and_claims_nothing(customer):
    make_message(customer, 200)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    again = call(worker, first["token"], 1, at=T0 + 50)
    assert again["batch"] == first["batch"]
    assert Recipient.objects.filter(status="leased").count() == 50
    assert Lease.objects.count() == 1


def test_an_out_of_order_seq_is_a_conflict(customer):
    make_message(customer, 10)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    with pytest.raises(wire.Conflict, match="expected 1"):
        call(worker, token, 2)


def test_a_report_naming_a_stranger_is_refused_and_records_nothing(customer):
    message = make_message(customer, 60)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    outsider = Recipient.objects.filter(message=message, status="queued").first()
    report = report_all_sent(first)
    report["results"].append(
        {"id": outsider.pk, "status": "sent", "provider_id": "z", "done_ms": 1}
    )
    with pytest.raises(wire.Conflict, match=str(outsider.pk)):
        call(worker, first["token"], 2, report)
    assert not Recipient.objects.filter(status="sent").exists()
    assert Lease.objects.get().state == "open"
    worker.refresh_from_db()
    assert worker.last_seq == 1


def test_an_open_lease_must_be_reported_before_more_is_granted(customer):
    make_message(customer, 100)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    with pytest.raises(wire.Conflict, match="report it"):
        call(worker, first["token"], 2)


def test_paused_customer_and_empty_queue_stop_the_worker(customer):
    make_message(customer, 0)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first, replayed = call(worker, token, 1), call(worker, token, 1)
    # Each answer's token is minted anew (its timestamp may tick between the two calls).
    assert {**first, "token": None} == {**replayed, "token": None, "decision": "stop"}
    worker.refresh_from_db()
    assert (worker.state, worker.stop_reason) == ("stopped", "done")

    make_message(customer, 5)
    SendLimit.objects.filter(customer=customer).update(paused=True)
    other, token = checkin.worker_start(customer_id=customer.pk)
    assert call(other, token, 1)["reason"] == "paused"


def test_suppressed_addresses_are_skipped_at_claim(customer):
    make_message(customer, 3)
    Suppression.objects.create(customer=customer, email="S1@state-u.edu", reason="unsubscribed")
    worker, token = checkin.worker_start(customer_id=customer.pk)
    answer = call(worker, token, 1)
    assert [r["to"] for r in answer["batch"]["recipients"]] == ["s0@state-u.edu", "s2@state-u.edu"]
    assert Recipient.objects.get(email="s1@state-u.edu").status == "suppressed"
    assert CustomerMinute.objects.get(customer=customer).granted == 2


def test_the_oldest_started_message_is_served_first(customer):
    newer = make_message(customer, 30, started_minutes_ago=1)
    older = make_message(customer, 30, started_minutes_ago=5, subject="Older")
    worker, token = checkin.worker_start(customer_id=customer.pk)
    answer = call(worker, token, 1)
    by_message = [r["message"] for r in answer["batch"]["recipients"]]
    assert by_message == [older.pk] * 30 + [newer.pk] * 20
    assert set(answer["batch"]["messages"]) == {str(older.pk), str(newer.pk)}


def test_a_second_delivery_of_the_same_worker_is_told_to_stop(customer):
    make_message(customer, 100)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    call(worker, token, 1, request_id="inv-1")
    duplicate = call(worker, token, 1, request_id="inv-1-again")
    assert duplicate["decision"] == "stop"
    assert Recipient.objects.filter(status="leased").count() == 50


def test_the_minute_budget_is_never_exceeded(customer):
    SendLimit.objects.filter(customer=customer).update(per_minute=120, max_workers=4)
    make_message(customer, 1000)
    workers = {}
    for _ in range(4):
        worker, token = checkin.worker_start(customer_id=customer.pk)
        workers[worker.pk] = [worker, token, 1, None]
    granted, at = 0, T0
    while workers:
        for key, (worker, token, seq, report) in list(workers.items()):
            at += 10
            answer = call(worker, token, seq, report, at=at)
            if answer["decision"] != "send":
                del workers[key]
                continue
            granted += len(answer["batch"]["recipients"])
            workers[key] = [worker, answer["token"], seq + 1, report_all_sent(answer)]
    assert granted == 120
    assert CustomerMinute.objects.get(customer=customer).granted == 120


def test_lease_reclaim_on_both_sides_of_the_watermark(customer):
    make_message(customer, 50)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    # Granted two seconds before the minute ends: its sends may arrive in the next minute.
    answer = call(worker, token, 1, at=T0 - 1_500 + WINDOW_MS - 2_000)
    lease_id = answer["batch"]["lease_id"]
    ids = [r["id"] for r in answer["batch"]["recipients"]]
    leases.record_progress(
        claims=tokens.verify(answer["token"]),
        request=parse_progress(
            {"worker_id": worker.pk, "lease_id": lease_id, "started_through": 20}
        ),
    )
    lease = Lease.objects.get(pk=lease_id)
    overdue = datetime_to_ms(lease.overdue_at)
    assert leases.reclaim_overdue(clock=Clock(overdue - 1)) == 0
    assert leases.reclaim_overdue(clock=Clock(overdue)) == 1
    statuses = dict(Recipient.objects.filter(id__in=ids).values_list("id", "status"))
    assert {statuses[i] for i in ids[:20]} == {"unknown"}
    assert {statuses[i] for i in ids[20:]} == {"queued"}
    assert Lease.objects.get(pk=lease_id).state == "expired"
    worker.refresh_from_db()
    assert worker.state == "lost"
    # The 30 past the mark were never started: their budget returns to the lease's minute; the
    # 20 in doubt stay charged there and, as they may cross, to the next minute too.
    assert lease.may_cross
    this_minute = CustomerMinute.objects.get(customer=customer, minute_start=lease.minute_start)
    assert (this_minute.granted, this_minute.refunded) == (50, 30)
    following = CustomerMinute.objects.get(
        customer=customer, minute_start=ms_to_datetime(T0 - 1_500 + WINDOW_MS)
    )
    assert following.carried_in == 20
    # The worker, if alive after all, may start nothing more.
    with pytest.raises(wire.Conflict, match="start nothing more"):
        leases.record_progress(
            claims=tokens.verify(answer["token"]),
            request=parse_progress(
                {"worker_id": worker.pk, "lease_id": lease_id, "started_through": 30}
            ),
        )


def test_a_lost_workers_refund_is_granted_again_in_the_same_minute(customer):
    """With the minute's budget all granted, a waiting worker comes back when the open lease falls
    due, not at the minute's end, so the refund of a lost worker's lease is used in its minute."""
    SendLimit.objects.filter(customer=customer).update(
        per_minute=6_000, batch_size=40, max_workers=2
    )
    make_message(customer, 3_000)  # enough that both workers are needed
    minute_start = ms_to_datetime(T0 - 1_500)
    # 40 left in this minute's budget; two workers of 100 sends/s.
    CustomerMinute.objects.create(
        customer=customer, minute_start=minute_start, cap=6_000, granted=5_960
    )
    lost, lost_token = checkin.worker_start(customer_id=customer.pk)
    waiting, waiting_token = checkin.worker_start(customer_id=customer.pk)
    Worker.objects.filter(pk__in=[lost.pk, waiting.pk]).update(rate_per_s=100.0)
    lost.refresh_from_db()
    waiting.refresh_from_db()
    granted = call(lost, lost_token, 1, at=T0)
    assert len(granted["batch"]["recipients"]) == 40
    lease = Lease.objects.get(pk=granted["batch"]["lease_id"])
    due = min(datetime_to_ms(lease.overdue_at), datetime_to_ms(lease.expires_at))
    minute_end = T0 - 1_500 + WINDOW_MS
    assert due + pacing.RECLAIM_SLACK_MS < minute_end - 10_000

    answer = call(waiting, waiting_token, 1, at=T0 + 10)
    assert answer["decision"] == "wait"
    assert answer["wait_ms"] == due + pacing.RECLAIM_SLACK_MS - (T0 + 10)

    # The first worker never reports: reclaimed when due, nothing started, all 40 refunded.
    assert leases.reclaim_overdue(clock=Clock(due)) == 1
    back = T0 + 10 + answer["wait_ms"]
    answer = call(waiting, answer["token"], 2, at=back)
    assert answer["decision"] == "send"
    assert len(answer["batch"]["recipients"]) == 40
    row = CustomerMinute.objects.get(customer=customer, minute_start=minute_start)
    assert (row.granted, row.refunded) == (6_040, 40)


def test_unknown_recipients_are_not_offered_again(customer):
    make_message(customer, 50)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    answer = call(worker, token, 1)
    lease = Lease.objects.get(pk=answer["batch"]["lease_id"])
    Lease.objects.filter(pk=lease.pk).update(started_through=50)
    leases.reclaim_overdue(clock=Clock(datetime_to_ms(lease.overdue_at)))
    worker2, token2 = checkin.worker_start(customer_id=customer.pk)
    later = datetime_to_ms(lease.overdue_at) + 1000
    assert call(worker2, token2, 1, at=later)["decision"] == "stop"


# --- the HTTP views --------------------------------------------------------------------------


@pytest.fixture
def fixed_clock(monkeypatch):
    monkeypatch.setattr(Clock, "read", classmethod(lambda cls: cls(T0)))


@pytest.fixture
def api(asgi_server, fixed_clock):
    customer = make_customer("http-u")
    make_message(customer, 100)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    return customer, worker, token


@pytest.fixture
def post(asgi_server):
    """POST to the worker API served by uvicorn; the response (requests)."""
    session = requests.Session()

    def post(path, body, token=None, content_type="application/json"):
        headers = {"Content-Type": content_type}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = body if isinstance(body, str | bytes) else json.dumps(body)
        return session.post(
            f"{asgi_server.url}/api/worker/v1/{path}", data=data, headers=headers, timeout=30
        )

    yield post
    session.close()


def test_http_checkin_grants_and_refreshes_the_token(post, api):
    _, worker, token = api
    response = post("checkin", {"worker_id": worker.pk, "seq": 1}, token)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["decision"] == "send" and len(body["batch"]["recipients"]) == 50
    assert tokens.verify(body["token"]) == tokens.WorkerClaims(worker.customer_id, worker.pk)


def test_http_missing_forged_and_expired_tokens_are_401(post, api, settings):
    _, worker, token = api
    body = {"worker_id": worker.pk, "seq": 1}
    assert post("checkin", body).status_code == 401
    forged = signing.dumps(
        {"c": worker.customer_id, "w": worker.pk}, key="not-our-key", salt=tokens.SALT
    )
    response = post("checkin", body, forged)
    assert response.status_code == 401
    assert "signature" in response.json()["error"]
    settings.WORKER_TOKEN_MAX_AGE = -1
    response = post("checkin", body, token)
    assert response.status_code == 401
    assert "expired" in response.json()["error"]
    assert not Lease.objects.exists()


def test_http_another_customers_token_is_403(post, api):
    _, worker, _ = api
    other = make_customer("other-u")
    _, other_token = checkin.worker_start(customer_id=other.pk)
    response = post("checkin", {"worker_id": worker.pk, "seq": 1}, other_token)
    assert response.status_code == 403
    assert not Lease.objects.exists()


def test_http_malformed_requests_are_400_and_say_what_is_wrong(post, api, asgi_server):
    _, worker, token = api
    response = post("checkin", "{not json", token)
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["problems"][0]
    response = post("checkin", {"worker_id": "seven", "seq": 0, "extra": 1}, token)
    assert response.status_code == 400
    problems = response.json()["problems"]
    assert "worker_id: required, an integer" in problems
    assert "seq: must be ≥ 1" in problems
    assert "unknown fields: extra" in problems
    response = post("checkin", {"worker_id": worker.pk, "seq": 1, "answer_ms": -1}, token)
    assert response.status_code == 400
    assert response.json()["problems"] == ["answer_ms: must be ≥ 0"]
    report = {"lease_id": 1, "elapsed_ms": 5, "results": [{"id": 3, "status": "bounced"}]}
    response = post("checkin", {"worker_id": worker.pk, "seq": 1, "report": report}, token)
    assert (
        "report.results[0].status: one of sent, failed, throttled, not_started, unknown"
        in (response.json()["problems"])
    )
    assert (
        post("checkin", {"worker_id": worker.pk, "seq": 1}, token, "text/plain").status_code == 400
    )
    assert requests.get(f"{asgi_server.url}/api/worker/v1/checkin", timeout=30).status_code == 405
    # Past 64 bits: what the database cannot hold is refused before it gets there.
    progress = {"worker_id": worker.pk, "lease_id": 1, "started_through": 2**63}
    response = post("progress", progress, token)
    assert response.status_code == 400
    assert response.json()["problems"] == [
        "started_through: must be ≤ 9223372036854775807 (a 64-bit integer)"
    ]
    response = post("checkin", '{"worker_id": 351267468138081494761472, "seq": 1}', token)
    assert response.json()["problems"] == ["worker_id: must be a 64-bit integer"]
    assert not Lease.objects.exists()


def test_http_report_outside_the_lease_is_409(post, api):
    customer, worker, token = api
    body = post("checkin", {"worker_id": worker.pk, "seq": 1}, token).json()
    outsider = Recipient.objects.filter(message__customer=customer, status="queued").first()
    report = {
        "lease_id": body["batch"]["lease_id"],
        "elapsed_ms": 10,
        "results": [{"id": outsider.pk, "status": "sent", "provider_id": "x", "done_ms": 5}],
    }
    response = post("checkin", {"worker_id": worker.pk, "seq": 2, "report": report}, body["token"])
    assert response.status_code == 409
    assert not Recipient.objects.filter(status="sent").exists()


def test_http_progress_is_recorded(post, api):
    _, worker, token = api
    body = post("checkin", {"worker_id": worker.pk, "seq": 1}, token).json()
    lease_id = body["batch"]["lease_id"]
    progress = {"worker_id": worker.pk, "lease_id": lease_id, "started_through": 16}
    assert post("progress", progress, body["token"]).status_code == 204
    assert Lease.objects.get(pk=lease_id).started_through == 16
    progress["started_through"] = 51
    assert post("progress", progress, body["token"]).status_code == 409


def test_http_a_grant_says_how_long_the_request_waited_before_the_decision(post, api, postgres):
    # The customer's lock is held elsewhere for 0.6 s while the check-in comes in: the answer
    # says the server held the request that long before reading its clock, so the worker can
    # anchor the window's end after the wait instead of at its request (sending.worker.batch).
    customer, worker, token = api
    with ThreadPoolExecutor(1) as pool:
        with transaction.atomic():
            SendLimit.objects.select_for_update().get(customer=customer)
            answered = pool.submit(post, "checkin", {"worker_id": worker.pk, "seq": 1}, token)
            time.sleep(0.6)
            assert not answered.done()
        body = answered.result(30).json()
    assert body["decision"] == "send"
    held = body["batch"]["held_ms"]
    assert 400 <= held < 30_000
    # Its report may wait as long: the lease falls overdue that much later.
    lease = Lease.objects.get(pk=body["batch"]["lease_id"])
    overdue_in_ms = datetime_to_ms(lease.overdue_at) - datetime_to_ms(lease.granted_at)
    assert overdue_in_ms == body["batch"]["stop_starting_in_ms"] + pacing.OVERDUE_SLACK_MS + held
    # A retry of the same seq replays the decision with the hold of the request it was made for.
    again = post("checkin", {"worker_id": worker.pk, "seq": 1}, token).json()
    assert again["batch"]["lease_id"] == body["batch"]["lease_id"]
    assert again["batch"]["held_ms"] == body["batch"]["held_ms"]


def test_http_openapi_is_served(asgi_server):
    response = requests.get(f"{asgi_server.url}/api/worker/v1/openapi.yaml", timeout=30)
    assert response.status_code == 200
    assert b"openapi: 3.0.3" in response.content


def test_a_send_in_doubt_is_recorded_unknown_and_charged_to_both_minutes(customer, settings):
    settings.SEND_TIMEOUT_MS = WINDOW_MS - 1_000  # the lease may cross into the next minute
    make_message(customer, 2)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    ids = [r["id"] for r in first["batch"]["recipients"]]
    report = {
        "lease_id": first["batch"]["lease_id"],
        "elapsed_ms": 5_000,
        "results": [
            {"id": ids[0], "status": "sent", "provider_id": "p", "done_ms": 40},
            {"id": ids[1], "status": "unknown", "error": "read timeout after 5 s"},
        ],
    }
    call(worker, first["token"], 2, report, at=T0 + 5_100)
    row = Recipient.objects.get(id=ids[1])
    assert (row.status, row.attempts, row.last_error) == ("unknown", 1, "read timeout after 5 s")
    this_minute, next_minute = CustomerMinute.objects.order_by("minute_start")
    assert (this_minute.granted, this_minute.refunded) == (2, 0)
    assert next_minute.carried_in == 1


def test_a_final_checkin_records_the_report_and_stops_the_worker(customer):
    make_message(customer, 100)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    body = {
        "worker_id": worker.pk,
        "seq": 2,
        "request_id": "inv-1",
        "report": report_all_sent(first),
        "final": True,
    }
    answer = checkin.checkin(
        claims=tokens.verify(first["token"]), request=parse_checkin(body), clock=Clock(T0 + 500)
    )
    assert (answer["decision"], answer["reason"]) == ("stop", "final check-in")
    assert Recipient.objects.filter(status="sent").count() == 50
    assert not Recipient.objects.filter(status="leased").exists()
    worker.refresh_from_db()
    assert worker.state == "stopped"


def test_a_throttled_worker_waits_out_its_minute_only(customer):
    make_message(customer, 100)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    ids = [r["id"] for r in first["batch"]["recipients"]]
    report = {
        "lease_id": first["batch"]["lease_id"],
        "elapsed_ms": 10,
        "results": [{"id": ids[0], "status": "throttled"}]
        + [{"id": i, "status": "not_started"} for i in ids[1:]],
    }
    second = call(worker, first["token"], 2, report, at=T0 + 100)
    assert second["decision"] == "wait"
    third = call(worker, second["token"], 3, at=T0 - 1_500 + WINDOW_MS + 300)
    assert third["decision"] == "send"


@pytest.mark.parametrize("batch_size", [10, 500])
def test_a_checkin_makes_as_many_queries_for_500_recipients_as_for_10(customer, batch_size):
    """No statement per recipient: reporting a batch and getting the next one costs the same
    number of queries whatever the batch's size."""
    SendLimit.objects.filter(customer=customer).update(per_minute=100_000, batch_size=batch_size)
    make_message(customer, 3 * batch_size)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    with CaptureQueriesContext(connection) as queries:
        second = call(worker, first["token"], 2, report_all_sent(first), at=T0 + 600)
    assert len(first["batch"]["recipients"]) == len(second["batch"]["recipients"]) == batch_size
    assert len(queries) == QUERIES_PER_CHECKIN, [q["sql"][:80] for q in queries]
