"""Every page of every registered admin answers for a superuser."""

import datetime

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    SolarSchedule,
)

from customers.models import Resubscription
from sending.models import CustomerPacing
from tests.factories import (
    ConductorLeaseFactory,
    CustomerFactory,
    CustomerMinuteFactory,
    LeaseFactory,
    MessageFactory,
    ProviderAccountFactory,
    RecipientFactory,
    SuppressionFactory,
    UserFactory,
    WorkerFactory,
)

REGISTERED = sorted(admin.site._registry, key=lambda model: model._meta.label)


def _periodic_task():
    interval = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(name="tick", task="emailops.tick", interval=interval)


MAKERS = {
    "auth.Group": lambda: Group.objects.get(name="Support"),
    "auth.User": lambda: UserFactory(),
    "customers.Customer": CustomerFactory,
    "customers.ProviderAccount": ProviderAccountFactory,
    "customers.SendLimit": lambda: CustomerFactory().send_limit,
    "customers.Suppression": SuppressionFactory,
    "customers.Resubscription": lambda: Resubscription.objects.create(
        customer=CustomerFactory(),
        email="back@example.edu",
        reason="asked to be mailed again",
        suppressed_reason="unsubscribed",
        suppressed_at=timezone.now(),
        created_by=UserFactory(),
    ),
    "sending.Message": MessageFactory,
    "sending.Recipient": RecipientFactory,
    "sending.Worker": WorkerFactory,
    "sending.Lease": LeaseFactory,
    "sending.CustomerMinute": CustomerMinuteFactory,
    "sending.ConductorLease": ConductorLeaseFactory,
    "sending.CustomerPacing": lambda: CustomerPacing.objects.create(
        customer=CustomerFactory(), learned_guard_ms=200, guard_learned_at=timezone.now()
    ),
    "django_celery_beat.ClockedSchedule": lambda: ClockedSchedule.objects.create(
        clocked_time=timezone.now() + datetime.timedelta(days=1)
    ),
    "django_celery_beat.CrontabSchedule": lambda: CrontabSchedule.objects.create(minute="*/5"),
    "django_celery_beat.IntervalSchedule": lambda: IntervalSchedule.objects.create(
        every=5, period=IntervalSchedule.MINUTES
    ),
    "django_celery_beat.SolarSchedule": lambda: SolarSchedule.objects.create(
        event="sunrise", latitude=52.2, longitude=0.12
    ),
    "django_celery_beat.PeriodicTask": _periodic_task,
}


def _instance(model):
    maker = MAKERS.get(model._meta.label)
    if maker is None:
        pytest.fail(f"Add a maker for {model._meta.label} to MAKERS so its change page is tested.")
    return maker()


def _url(model, view, *args):
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


@pytest.mark.parametrize("model", REGISTERED, ids=lambda model: model._meta.label)
def test_changelist_answers_with_and_without_rows(admin_client, model):
    assert admin_client.get(_url(model, "changelist")).status_code == 200
    _instance(model)
    assert admin_client.get(_url(model, "changelist")).status_code == 200


@pytest.mark.parametrize("model", REGISTERED, ids=lambda model: model._meta.label)
def test_add_page_answers_or_is_refused_on_purpose(admin_client, rf, model):
    model_admin = admin.site._registry[model]
    response = admin_client.get(_url(model, "add"))
    request = rf.get("/")
    request.user = response.wsgi_request.user
    expected = 200 if model_admin.has_add_permission(request) else 403
    assert response.status_code == expected


@pytest.mark.parametrize("model", REGISTERED, ids=lambda model: model._meta.label)
def test_change_and_history_pages_answer(admin_client, model):
    obj = _instance(model)
    assert admin_client.get(_url(model, "change", obj.pk)).status_code == 200
    assert admin_client.get(_url(model, "history", obj.pk)).status_code == 200
