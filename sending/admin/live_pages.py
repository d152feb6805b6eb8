"""The live pages in admin: every customer sending now, one customer's send as it happens, and the
live page's steering (limits changed while a send runs).

Served under the read-only CustomerMinute admin's URLs (see sending.admin.engine), through
`admin_site.admin_view`, with the admin's `each_context`. The pages load no inline script or
style: the numbers travel as JSON data blocks (`json_script`), drawn by static/emailops/live.js.
"""

import time

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.timezone import localtime

from customers.models import PER_MINUTE_MAX, Customer, SendLimit
from customers.services import STEERABLE_FIELDS, send_limit_steer

from .. import live
from ..clock import ms_to_datetime
from ..models import Worker
from ..overview import overview
from ..permissions import may_steer, may_watch

RECENT_ERRORS = 10
NORMAL_STOPS = ("done", "final check-in", "")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SteerForm(forms.Form):
    """The live page's controls. Each field comes with the value the page showed (`was_…`), so
    only what this person changed is applied: a change someone else made meanwhile stays."""

    per_minute = forms.IntegerField(label="Per minute", min_value=1, max_value=PER_MINUTE_MAX)
    max_workers = forms.IntegerField(label="Max workers", min_value=1, max_value=100)
    concurrency = forms.IntegerField(label="Concurrency", min_value=1, max_value=64)
    paused = forms.BooleanField(label="Paused (no new batches)", required=False)

    def __init__(self, *args, limit: SendLimit, **kwargs):
        super().__init__(*args, initial={f: getattr(limit, f) for f in STEERABLE_FIELDS}, **kwargs)
        for name in STEERABLE_FIELDS:
            self.fields[f"was_{name}"] = forms.CharField(
                widget=forms.HiddenInput, required=False, initial=str(getattr(limit, name))
            )

    def changes(self) -> dict:
        data = self.cleaned_data
        return {
            name: data[name]
            for name in STEERABLE_FIELDS
            if str(data[name]) != (data.get(f"was_{name}") or "")
        }


def _recent_errors(customer_id: int) -> list[Worker]:
    return list(
        Worker.objects.filter(customer_id=customer_id, state__in=[Worker.State.LOST, "stopped"])
        .exclude(stop_reason__in=NORMAL_STOPS)
        .defer("last_response")
        .order_by("-id")[:RECENT_ERRORS]
    )


def customer_live_view(request, customer_id: int):
    if not may_watch(request.user):
        raise PermissionDenied
    customer = get_object_or_404(
        Customer.objects.select_related("send_limit", "provider_account"), pk=customer_id
    )
    now_ms = _now_ms()
    snapshot = live.snapshot(customer.pk, now_ms)
    snapshot["time_zone"] = str(customer.time_zone)
    snapshot["name"] = customer.name
    can_steer = may_steer(request.user)
    context = {
        **admin.site.each_context(request),
        "title": f"Live: {customer.name}",
        "customer": customer,
        "limit": customer.send_limit,
        "snapshot": snapshot,
        "sample": snapshot["sample"],
        "minutes": [
            {**row, "at": localtime(ms_to_datetime(row["t"]), customer.time_zone)}
            for row in reversed(snapshot["minutes"][-60:])
        ],
        "annotations": [
            {**note, "at": localtime(ms_to_datetime(note["t"]), customer.time_zone)}
            for note in snapshot["annotations"]
        ],
        "errors": _recent_errors(customer.pk),
        "form": SteerForm(limit=customer.send_limit) if can_steer else None,
        "can_steer": can_steer,
        "steer_url": reverse("admin:sending_live_steer", args=[customer.pk]),
        "ws_path": f"/ws/live/customer/{customer.pk}/",
        "overview_url": reverse("admin:sending_live_overview"),
        "messages_url": reverse("admin:sending_message_changelist")
        + f"?customer__id__exact={customer.pk}",
        "minutes_url": reverse("admin:sending_customerminute_changelist")
        + f"?customer__id__exact={customer.pk}",
        "workers_url": reverse("admin:sending_worker_changelist")
        + f"?customer__id__exact={customer.pk}",
        "leases_url": reverse("admin:sending_lease_changelist")
        + f"?customer__id__exact={customer.pk}",
        "customer_url": reverse("admin:customers_customer_change", args=[customer.pk]),
    }
    return TemplateResponse(request, "admin/sending/live/customer.html", context)


def steer_view(request, customer_id: int):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    if not may_steer(request.user):
        raise PermissionDenied
    customer = get_object_or_404(Customer.objects.select_related("send_limit"), pk=customer_id)
    form = SteerForm(request.POST, limit=customer.send_limit)
    back = reverse("admin:sending_live_customer", args=[customer.pk])
    if not form.is_valid():
        problems = "; ".join(
            f"{form.fields[name].label}: {' '.join(errors)}" for name, errors in form.errors.items()
        )
        messages.error(request, f"Nothing changed. {problems}")
        return HttpResponseRedirect(back)
    try:
        _, delta = send_limit_steer(
            customer_id=customer.pk, user=request.user, changes=form.changes()
        )
    except ValidationError as exc:
        messages.error(request, "Nothing changed. " + " ".join(exc.messages))
        return HttpResponseRedirect(back)
    if not delta:
        messages.info(request, "Nothing to change.")
        return HttpResponseRedirect(back)
    text = ", ".join(
        f"{name.replace('_', ' ')} {old} → {new}" for name, (old, new) in delta.items()
    )
    live.publish_annotation(
        customer_id=customer.pk,
        annotation={"t": _now_ms(), "who": request.user.get_username(), "text": text},
    )
    messages.success(request, f"Changed: {text}. Applied at the next check-in.")
    return HttpResponseRedirect(back)


def overview_view(request):
    if not may_watch(request.user):
        raise PermissionDenied
    snapshot = overview(_now_ms())
    for line in snapshot["customers"]:
        line["url"] = reverse("admin:sending_live_customer", args=[line["customer"]])
    context = {
        **admin.site.each_context(request),
        "title": "Sending now",
        "snapshot": snapshot,
        "ws_path": "/ws/live/overview/",
    }
    return TemplateResponse(request, "admin/sending/live/overview.html", context)
