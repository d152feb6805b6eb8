"""The planner's timeline of competing sends, and the confirmation plan built on it."""

from datetime import timedelta

import pytest
from django.utils import timezone

from customers.models import SendLimit
from sending import confirm
from sending.models import Message, Worker
from sending.planner import Send, customer_per_minute, plan_sends, timeline
from tests.factories import CustomerFactory, ProviderAccountFactory, make_message


def test_two_customers_sharing_an_account_share_its_cap():
    # 45,000 at 4,500/min alone: 10 min. The second (9,000) starts after 5 min; both limits are
    # the account's cap, so they get 2,250/min each while both run.
    a = Send(key=1, customer=1, account=9, starts_s=0, remaining=45_000, per_minute=4_500)
    b = Send(key=2, customer=2, account=9, starts_s=300, remaining=9_000, per_minute=4_500)
    plans = plan_sends([a, b], account_caps={9: 4_500})
    assert plans[1].alone_s == 600 and plans[1].seconds == pytest.approx(720)
    assert plans[2].alone_s == 420 and plans[2].seconds == pytest.approx(540)
    assert plans[1].shared_with == (2,) and plans[1].delayed


def test_a_customer_that_needs_less_leaves_the_rest_to_the_other():
    a = Send(key=1, customer=1, account=9, starts_s=0, remaining=6_000, per_minute=1_000)
    b = Send(key=2, customer=2, account=9, starts_s=0, remaining=6_000, per_minute=6_000)
    finish = timeline([a, b], account_caps={9: 4_000})
    assert finish[1] == pytest.approx(360)  # its own limit: 1,000/min
    assert finish[2] == pytest.approx(120)  # the other 3,000/min of the cap


def test_one_customers_messages_run_one_after_the_other():
    first = Send(key=1, customer=1, account=None, starts_s=-10, remaining=600, per_minute=600)
    second = Send(key=2, customer=1, account=None, starts_s=0, remaining=600, per_minute=600)
    plans = plan_sends([first, second], account_caps={})
    assert plans[1].seconds == pytest.approx(60) and not plans[1].delayed
    assert plans[2].seconds == pytest.approx(120) and plans[2].alone_s == pytest.approx(60)


def test_separate_accounts_do_not_compete():
    a = Send(key=1, customer=1, account=1, starts_s=0, remaining=600, per_minute=600)
    b = Send(key=2, customer=2, account=2, starts_s=0, remaining=600, per_minute=600)
    plans = plan_sends([a, b], account_caps={1: 600, 2: 600})
    assert plans[1].shared_with == () and plans[1].seconds == pytest.approx(60)


def test_a_paused_customer_never_finishes_and_workers_can_set_the_rate():
    paused = Send(key=1, customer=1, account=None, starts_s=0, remaining=10, per_minute=0)
    assert timeline([paused], account_caps={})[1] is None
    assert customer_per_minute(
        per_minute=6_000, account_cap=None, max_workers=2, worker_per_s=10
    ) == (1_200, "2 workers at the measured rate")
    assert customer_per_minute(
        per_minute=600, account_cap=500, max_workers=2, worker_per_s=None
    ) == (500, "the provider account's cap")


@pytest.mark.django_db
def test_the_confirmation_flags_a_send_that_competes_for_the_account():
    account = ProviderAccountFactory(per_minute_cap=4_500)
    running_customer = CustomerFactory(provider_account=account, time_zone="America/Chicago")
    new_customer = CustomerFactory(provider_account=account, time_zone="America/Chicago")
    SendLimit.objects.filter(customer__in=[running_customer, new_customer]).update(
        per_minute=4_500, max_workers=5
    )
    make_message(running_customer, 450)  # 6 s alone
    new = make_message(new_customer, 450)
    Message.objects.filter(pk=new.pk).update(status="draft", started_at=None)
    new.refresh_from_db()
    plan = confirm.send_plan(new, at=timezone.now() + timedelta(seconds=3))
    assert plan.recipients == 450 and plan.sharing == 1
    assert len(plan.overlaps) == 1
    text = plan.overlaps[0]
    assert f"({running_customer}) share 4,500/min (the provider account's cap)" in text
    assert "finishes at" in text and ", not " in text
    # A worker rate measured slower than the limit sets the rate.
    Worker.objects.create(customer=new_customer, rate_per_s=5)
    plan = confirm.send_plan(new)
    assert plan.plan.per_minute == 1_500 and "workers" in plan.plan.reason
