"""The recipients' admin: a list made for hundreds of millions of rows, and the delivery log
export — a permission of its own (sending.export_recipients), and every export recorded (an admin
LogEntry, on the message's history when it is one message's log, and a log line)."""

import csv
import datetime
import logging

from django.contrib import admin
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Q
from django.db.models.functions import Lower
from django.http import HttpResponseRedirect, StreamingHttpResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.text import Truncator

from ..models import Message, Recipient
from ..selectors import (
    DELIVERY_LOG_COLUMNS,
    delivery_log_rows,
    recent_messages,
)

logger = logging.getLogger(__name__)

EXPORT_PERMISSION = "sending.export_recipients"

# Recipients -------------------------------------------------------------------------------------


class CappedCountPaginator(Paginator):
    """Counts at most `cap` + 1 rows: an exact count of a huge table is a full scan."""

    cap = 10_000

    @cached_property
    def count(self):
        return self.object_list.order_by()[: self.cap + 1].count()

    @property
    def capped(self) -> bool:
        return self.count > self.cap


class RecentMessageFilter(admin.SimpleListFilter):
    """The latest messages (and the one selected), rather than a list of every message."""

    title = "message"
    parameter_name = "message__id__exact"
    shown = 20

    def lookups(self, request, model_admin):
        messages = list(recent_messages(limit=self.shown))
        selected = self.value()
        if selected and selected.isdigit() and all(str(m.pk) != selected for m in messages):
            messages += list(Message.objects.select_related("customer").filter(pk=selected))
        return [
            (str(m.pk), f"{Truncator(m.subject).chars(40)} ({m.customer}, #{m.pk})")
            for m in messages
        ]

    def queryset(self, request, queryset):
        if self.value() is None:
            return queryset
        return queryset.filter(message_id=int(self.value()))


class _Echo:
    """The file-like object csv.writer writes to: it hands each line back."""

    def write(self, value):
        return value


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    text = str(value)
    # A provider's error text opened in a spreadsheet must not become a formula.
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def delivery_log_response(
    queryset, *, filename: str, request, message_id: int | None = None, scope: str = ""
) -> StreamingHttpResponse:
    """A delivery log as CSV, for a user who may export one; the export is recorded first."""
    if not request.user.has_perm(EXPORT_PERMISSION):
        raise PermissionDenied
    record_export(request, message_id=message_id, scope=scope)
    writer = csv.writer(_Echo())

    def lines():
        yield writer.writerow(DELIVERY_LOG_COLUMNS)
        for row in delivery_log_rows(queryset):
            yield writer.writerow([_csv_cell(value) for value in row])

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def record_export(request, *, message_id: int | None, scope: str) -> None:
    """Who exported which delivery log, when: an admin LogEntry (on the message's history page
    when the log is one message's) and a log line."""
    message = Message.objects.filter(pk=message_id).first() if message_id else None
    target = message if message is not None else Recipient
    LogEntry.objects.create(
        user_id=request.user.pk,
        content_type=ContentType.objects.get_for_model(target),
        object_id=str(message.pk) if message is not None else None,
        object_repr=str(message)[:200] if message is not None else "delivery log",
        action_flag=CHANGE,
        change_message=f"Exported the delivery log (CSV): {scope or 'all recipients'}.",
    )
    logger.info(
        "delivery log exported by user %s: message %s, %s",
        request.user.pk,
        message_id or "-",
        scope or "all recipients",
    )


def _message_id(request) -> int | None:
    value = request.GET.get("message__id__exact", "")
    return int(value) if value.isdigit() else None


def _delivery_log_filename(request) -> str:
    message_id = request.GET.get("message__id__exact", "")
    scope = f"message-{message_id}" if message_id.isdigit() else "recipients"
    return f"delivery-log-{scope}-{timezone.now():%Y%m%d-%H%M%S}.csv"


@admin.register(Recipient)
class RecipientAdmin(admin.ModelAdmin):
    list_display = ("email", "message", "status", "attempts", "sent_at", "provider_message_id")
    list_filter = ("status", RecentMessageFilter)
    list_select_related = ("message",)
    search_fields = ("email", "provider_message_id")
    search_help_text = "An exact email address or provider message id."
    ordering = ("-id",)
    list_per_page = 100
    paginator = CappedCountPaginator
    # There will be hundreds of millions of rows: no full count, no facet counts.
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    actions = ["export_delivery_log"]
    fields = (
        "message",
        "email",
        "merge_data",
        "status",
        "attempts",
        "sent_at",
        "provider_message_id",
        "last_error",
    )
    system_fields = (
        "message",
        "status",
        "attempts",
        "provider_message_id",
        "last_error",
        "sent_at",
    )

    def has_add_permission(self, request):
        return False  # recipients arrive by import, on the message's page

    def has_export_permission(self, request):
        return self.has_view_permission(request) and request.user.has_perm(EXPORT_PERMISSION)

    def changelist_view(self, request, extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "has_export_permission": self.has_export_permission(request),
        }
        return super().changelist_view(request, extra_context)

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.message.is_content_frozen:
            return False
        return super().has_delete_permission(request, obj)

    def get_actions(self, request):
        actions = super().get_actions(request)
        # Bulk delete would load every selected recipient into memory first.
        actions.pop("delete_selected", None)
        return actions

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and obj.message.is_content_frozen:
            return self.fields
        return self.system_fields

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        # Exact matches only: Lower(email) is how the unique index stores addresses.
        queryset = queryset.alias(email_lower=Lower("email")).filter(
            Q(email_lower=term.lower()) | Q(provider_message_id=term)
        )
        return queryset, False

    def get_urls(self):
        urls = [
            path(
                "export/",
                self.admin_site.admin_view(self.export_view),
                name="sending_recipient_export",
            ),
        ]
        return urls + super().get_urls()

    def export_view(self, request):
        """The delivery log of what the changelist shows, with the same filters and search."""
        if not self.has_export_permission(request):
            raise PermissionDenied
        try:
            changelist = self.get_changelist_instance(request)
        except IncorrectLookupParameters:
            return HttpResponseRedirect(reverse("admin:sending_recipient_changelist") + "?e=1")
        filters = request.GET.urlencode()
        return delivery_log_response(
            changelist.queryset,
            filename=_delivery_log_filename(request),
            request=request,
            message_id=_message_id(request),
            scope=f"the list filtered by {filters}" if filters else "",
        )

    @admin.action(description="Export delivery log (CSV)", permissions=["export"])
    def export_delivery_log(self, request, queryset):
        selected = len(request.POST.getlist(admin.helpers.ACTION_CHECKBOX_NAME))
        return delivery_log_response(
            queryset,
            filename=_delivery_log_filename(request),
            request=request,
            message_id=_message_id(request),
            scope=f"{selected} selected recipient(s)",
        )
