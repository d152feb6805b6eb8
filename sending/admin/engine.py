"""Read-only admin for the engine's tables: workers, leases, customer-minutes, conductor leases,
and what pacing learned from refusals (customer pacing).

Made to answer "what happened to this send at 11:27?": every list filters by customer and
state, drills down by date, and takes an exact minute (`?minute_start__exact=…` from the live
page's per-minute table links). Nothing here can be edited: these rows are the engine's record.
A worker's stored answer is shown only as a summary: it is stored without the provider block
(wire.replayable), and the page would not show that block even if an old row still had one.
"""

from urllib.parse import urlencode

from django.contrib import admin
from django.urls import path, reverse
from django.utils.html import format_html

from .. import throttle
from ..clock import Clock, datetime_to_ms
from ..models import ConductorLease, CustomerMinute, CustomerPacing, Lease, Worker
from .live_pages import customer_live_view, overview_view, steer_view


class ReadOnlyAdmin(admin.ModelAdmin):
    list_select_related = ("customer",)
    list_per_page = 100
    show_facets = admin.ShowFacets.NEVER

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


def minute_url(model: str, customer_id: int, minute_start) -> str:
    """A changelist of the engine's rows of one customer in one calendar minute."""
    query = urlencode(
        {"customer__id__exact": customer_id, "minute_start__exact": minute_start.isoformat()}
    )
    return f"{reverse(f'admin:sending_{model}_changelist')}?{query}"


def live_link(customer_id: int) -> str:
    return format_html(
        '<a href="{}">live</a>', reverse("admin:sending_live_customer", args=[customer_id])
    )


@admin.register(Worker)
class WorkerAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "customer",
        "runtime",
        "state",
        "started_at",
        "last_checkin_at",
        "stopped_at",
        "rate_per_s",
        "stop_reason",
    )
    list_filter = ("state", "runtime", "customer")
    date_hierarchy = "started_at"
    search_fields = ("=id", "request_id")
    ordering = ("-id",)
    # Never last_response itself: a summary, without provider or recipients.
    fields = (
        "customer",
        "runtime",
        "request_id",
        "state",
        "stop_reason",
        "last_seq",
        "last_answer",
        "rate_per_s",
        "throttled_minute",
        "started_at",
        "last_checkin_at",
        "stopped_at",
    )
    readonly_fields = fields

    @admin.display(description="Last answer")
    def last_answer(self, obj):
        return answer_summary(obj.last_response)

    def get_queryset(self, request):
        return super().get_queryset(request).defer("last_response")


def answer_summary(answer: dict | None) -> str:
    """What a stored answer said, without its provider block or recipients."""
    if not answer:
        return "—"
    decision = answer.get("decision", "?")
    batch = answer.get("batch") or {}
    if decision == "send":
        return (
            f"send: lease {batch.get('lease_id')}, start in {batch.get('start_in_ms')} ms, "
            f"stop starting in {batch.get('stop_starting_in_ms')} ms, "
            f"concurrency {batch.get('concurrency')}"
        )
    if decision == "wait":
        return f"wait {answer.get('wait_ms')} ms"
    return f"{decision}: {answer.get('reason', '')}".rstrip(": ")


@admin.register(Lease)
class LeaseAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "customer",
        "worker",
        "state",
        "minute_start",
        "size",
        "started_through",
        "granted_at",
        "settled_at",
    )
    list_filter = ("state", "customer", "may_cross")
    date_hierarchy = "minute_start"
    search_fields = ("=id", "=worker__id")
    ordering = ("-id",)
    exclude = ("recipient_ids", "awaiting")
    readonly_fields = (
        "customer",
        "worker",
        "state",
        "minute_start",
        "size",
        "recipients",
        "awaiting_late",
        "granted_at",
        "start_at",
        "stop_starting_at",
        "minute_ends_in_ms",
        "guard_ms",
        "may_cross",
        "started_through",
        "overdue_at",
        "expires_at",
        "settled_at",
    )

    @admin.display(description="Recipients")
    def recipients(self, obj):
        return _some(obj.recipient_ids)

    @admin.display(description="Awaiting a late report")
    def awaiting_late(self, obj):
        """Recipients it was settled without an outcome for, that no late report spoke for yet."""
        if obj.awaiting is None:
            return "—" if obj.state == Lease.State.OPEN else "(settled before this was kept)"
        return _some(obj.awaiting)


def _some(ids) -> str:
    ids = ids or []
    shown = ", ".join(str(i) for i in ids[:20])
    return f"{len(ids)}: {shown}{' …' if len(ids) > 20 else ''}"


@admin.register(CustomerMinute)
class CustomerMinuteAdmin(ReadOnlyAdmin):
    list_display = (
        "minute_start",
        "customer",
        "cap",
        "granted",
        "refunded",
        "carried_in",
        "charged",
        "sent",
        "failed",
        "throttled",
        "leases",
    )
    list_filter = ("customer",)
    date_hierarchy = "minute_start"
    ordering = ("-minute_start", "customer")

    @admin.display(description="Charged")
    def charged(self, obj):
        return obj.charged

    @admin.display(description="Leases")
    def leases(self, obj):
        return format_html(
            '<a href="{}">leases</a> · {}',
            minute_url("lease", obj.customer_id, obj.minute_start),
            live_link(obj.customer_id),
        )

    def get_urls(self):
        site = self.admin_site
        return [
            path("live/", site.admin_view(overview_view), name="sending_live_overview"),
            path(
                "live/<int:customer_id>/",
                site.admin_view(customer_live_view),
                name="sending_live_customer",
            ),
            path(
                "live/<int:customer_id>/steer/",
                site.admin_view(steer_view),
                name="sending_live_steer",
            ),
            *super().get_urls(),
        ]


@admin.register(ConductorLease)
class ConductorLeaseAdmin(ReadOnlyAdmin):
    list_display = ("customer", "holder", "heartbeat_at", "expires_at", "live")
    search_fields = ("customer__name", "customer__slug")
    ordering = ("customer__name",)

    @admin.display(description="Live page")
    def live(self, obj):
        return live_link(obj.customer_id)


@admin.register(CustomerPacing)
class CustomerPacingAdmin(ReadOnlyAdmin):
    """What pacing learned from the provider's refusals, and why (docs/pacing.md,
    "Throttling"): the start guard widening in force now (it halves every hour without
    refusals), the back-off, and the cap estimate of the minute it was learned in."""

    list_display = ("customer", "guard_in_force", "cap_estimate", "last_refusal_at", "last_refusal")
    list_filter = ("customer",)
    ordering = ("-last_refusal_at",)
    fields = (
        "customer",
        "guard_in_force",
        "learned_guard_ms",
        "guard_learned_at",
        "hold_until",
        "cap_estimate",
        "estimate_minute",
        "last_refusal_at",
        "last_refusal",
    )
    readonly_fields = fields

    @admin.display(description="Guard widening now (ms)")
    def guard_in_force(self, obj):
        learned_at = None if obj.guard_learned_at is None else datetime_to_ms(obj.guard_learned_at)
        return throttle.decayed_guard_ms(obj.learned_guard_ms, learned_at, Clock.read().now_ms)
