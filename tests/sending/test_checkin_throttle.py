"""The check-in's throttling rules and shared provider accounts, through the service on the
database (fixed clocks; the same paths run end to end in tests/sending/test_faults_throttle.py)."""

from datetime import timedelta

import pytest

from customers.models import SendLimit
from sending import checkin, throttle
from sending.clock import ms_to_datetime
from sending.models import CustomerMinute, CustomerPacing, Lease
from tests.factories import (
    T0,
    WINDOW_MS,
    CustomerFactory,
    ProviderAccountFactory,
    call,
    make_message,
)

MINUTE = T0 - 1_500  # the start of T0's minute


def on_account(account, *, per_minute, batch_size=1_000):
    customer = CustomerFactory(provider_account=account)
    SendLimit.objects.filter(customer=customer).update(
        per_minute=per_minute, batch_size=batch_size, max_workers=5
    )
    return customer


def refused(answer, *, done_ms, retry_after_ms=None, sent=0):
    """A report: the first `sent` recipients sent, the next one refused, the rest not started."""
    batch = answer["batch"]
    ids = [r["id"] for r in batch["recipients"]]
    results = [
        {"id": i, "status": "sent", "provider_id": f"p{i}", "done_ms": done_ms} for i in ids[:sent]
    ]
    throttled = {"id": ids[sent], "status": "throttled", "error": "429", "done_ms": done_ms}
    if retry_after_ms is not None:
        throttled["retry_after_ms"] = retry_after_ms
    results.append(throttled)
    results += [{"id": i, "status": "not_started"} for i in ids[sent + 1 :]]
    return {"lease_id": batch["lease_id"], "elapsed_ms": done_ms, "results": results}


@pytest.fixture
def customer(db):
    return on_account(ProviderAccountFactory(per_minute_cap=1_000), per_minute=600, batch_size=50)


def test_a_refusal_at_the_minute_start_after_a_full_minute_costs_a_second_not_the_minute(
    customer,
):
    CustomerMinute.objects.create(
        customer=customer,
        minute_start=ms_to_datetime(MINUTE - WINDOW_MS),
        cap=600,
        granted=600,
    )
    make_message(customer, 200)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1, at=MINUTE)
    assert first["batch"]["start_in_ms"] == 250
    # The provider's clock is behind: its full minute refuses the send at 400 ms.
    report = refused(first, done_ms=400, retry_after_ms=1_000)
    answer = call(worker, first["token"], 2, report, at=MINUTE + 450)
    pacing_row = CustomerPacing.objects.get(customer=customer)
    assert pacing_row.learned_guard_ms == 400 - 250 + throttle.GUARD_MARGIN_MS
    assert pacing_row.cap_estimate is None
    assert "not turned" in pacing_row.last_refusal
    # It honours the Retry-After (1 s after the refusal), with jitter, then sends again.
    assert answer["decision"] == "wait"
    assert 1_400 - 450 <= answer["wait_ms"] < 1_400 - 450 + throttle.JITTER_MS
    again = call(worker, answer["token"], 3, at=MINUTE + 450 + answer["wait_ms"])
    assert again["decision"] == "send" and len(again["batch"]["recipients"]) == 50
    # The next minute's window opens later by what was learned; its end guard is unchanged.
    unused = {
        "lease_id": again["batch"]["lease_id"],
        "elapsed_ms": 0,
        "results": [{"id": r["id"], "status": "not_started"} for r in again["batch"]["recipients"]],
    }
    nxt = call(worker, again["token"], 4, unused, at=MINUTE + WINDOW_MS)
    assert nxt["decision"] == "send"
    # (a minute of its one-hour half-life has passed: 250 ms decayed to 247)
    assert nxt["batch"]["start_in_ms"] == 250 + throttle.decayed_guard_ms(
        250, MINUTE, MINUTE + WINDOW_MS
    )
    assert nxt["batch"]["start_in_ms"] == 497


def test_a_refusal_mid_minute_below_our_count_caps_the_rest_of_that_minute_only(customer):
    make_message(customer, 400)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)  # T0: 1.5 s into the minute
    answer = call(worker, first["token"], 2, refused(first, done_ms=2_000, sent=10), at=T0 + 2_100)
    pacing_row = CustomerPacing.objects.get(customer=customer)
    assert pacing_row.cap_estimate == 10  # what the provider took before it refused
    assert pacing_row.estimate_minute == ms_to_datetime(MINUTE)
    assert "someone else sends" in pacing_row.last_refusal
    assert answer["decision"] == "wait"
    assert answer["wait_ms"] <= throttle.BACKOFF_MS + throttle.JITTER_MS
    # After the back-off: nothing more this minute (the estimate is used up) ...
    later = call(worker, answer["token"], 3, at=T0 + 10_000)
    assert later == {**later, "decision": "wait", "wait_ms": WINDOW_MS - 11_500}
    # ... and the next minute starts again at the customer's own limit.
    nxt = call(worker, later["token"], 4, at=MINUTE + WINDOW_MS)
    assert nxt["decision"] == "send" and len(nxt["batch"]["recipients"]) == 50


def grant_all(customers, *, at, rounds=10):
    """Each customer's worker checks in, round-robin, reporting nothing sent yet; the recipients
    granted per customer."""
    workers = {c.pk: checkin.worker_start(customer_id=c.pk) for c in customers}
    seqs = dict.fromkeys(workers, 0)
    for _ in range(rounds):
        for pk, (worker, token) in list(workers.items()):
            seqs[pk] += 1
            lease = Lease.objects.filter(worker=worker, state=Lease.State.OPEN).first()
            report = None
            if lease is not None:
                report = {"lease_id": lease.pk, "elapsed_ms": 0, "results": []}
                # Everything started: charged as sent.
                report["results"] = [
                    {"id": i, "status": "sent", "provider_id": f"p{i}", "done_ms": 10}
                    for i in lease.recipient_ids
                ]
            answer = call(worker, token, seqs[pk], report, at=at, request_id=f"r{pk}")
            workers[pk] = (worker, answer["token"])
    return {
        c.pk: sum(m.charged for m in CustomerMinute.objects.filter(customer=c)) for c in customers
    }


def test_three_customers_on_one_account_share_its_cap_equally(db):
    account = ProviderAccountFactory(per_minute_cap=1_200)
    sharing = [on_account(account, per_minute=1_000, batch_size=100) for _ in range(3)]
    alone = on_account(ProviderAccountFactory(per_minute_cap=1_200), per_minute=1_000)
    for c in [*sharing, alone]:
        make_message(c, 2_000)
    charged = grant_all([*sharing, alone], at=T0, rounds=12)
    # Together exactly the account's cap, each an equal share; the customer on its own account
    # is not held back by them.
    assert [charged[c.pk] for c in sharing] == [400, 400, 400]
    assert charged[alone.pk] == 1_000


def test_a_sharer_without_backlog_leaves_its_share_to_the_others(db):
    account = ProviderAccountFactory(per_minute_cap=1_200)
    busy = [on_account(account, per_minute=1_000, batch_size=100) for _ in range(2)]
    on_account(account, per_minute=1_000)  # nothing to send
    for c in busy:
        make_message(c, 2_000)
    charged = grant_all(busy, at=T0, rounds=10)
    assert [charged[c.pk] for c in busy] == [600, 600]


def test_the_learned_guard_decays_with_its_half_life(customer):
    CustomerPacing.objects.create(
        customer=customer,
        learned_guard_ms=400,
        guard_learned_at=ms_to_datetime(MINUTE) - timedelta(hours=1),
    )
    make_message(customer, 100)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    answer = call(worker, token, 1, at=MINUTE)
    assert answer["batch"]["start_in_ms"] == 250 + 200
