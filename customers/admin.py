"""The customers' admin: customers with their one send limit inline (and its recent changes), send
limits on their own pages (history kept), suppressions. Provider accounts: admin_accounts.py."""

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, F, Q
from django.forms.models import BaseInlineFormSet
from django.http import Http404
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from . import (
    admin_accounts,  # noqa: F401 - registers the provider accounts' admin
    domain_check,
)
from .admin_history import AuditedAdmin
from .models import Customer, SendLimit
from .services import send_limit_ensure, send_limit_fits_account

SEND_LIMIT_FIELDS = ("per_minute", "max_workers", "batch_size", "concurrency", "guard_ms", "paused")
SEND_LIMIT_CHANGES_SHOWN = 10


# Customers and their send limits ----------------------------------------------------------------


class SendLimitInlineFormSet(BaseInlineFormSet):
    """Checks the limit against the provider account chosen in the same form.

    SendLimit.clean() cannot see an account picked for a customer that is not saved yet, and
    nothing else notices a customer moved to an account with a lower cap.
    """

    def clean(self):
        super().clean()
        account = self.instance.provider_account
        for form in self.forms:
            per_minute = getattr(form, "cleaned_data", {}).get("per_minute")
            if form.errors or per_minute is None:
                continue
            try:
                send_limit_fits_account(per_minute=per_minute, account=account)
            except ValidationError:
                raise ValidationError(
                    f"The send limit of {per_minute}/min is above the cap of {account.name} "
                    f"({account.per_minute_cap}/min). Lower the send limit, or choose another "
                    "provider account."
                ) from None


class SendLimitInline(admin.StackedInline):
    model = SendLimit
    formset = SendLimitInlineFormSet
    fields = SEND_LIMIT_FIELDS
    can_delete = False
    extra = 1
    max_num = 1
    verbose_name = "send limit"
    verbose_name_plural = "send limit"


def send_limit_changes_html(limit: SendLimit | None, *, shown: int = SEND_LIMIT_CHANGES_SHOWN):
    """The latest changes to a send limit: who, when, and each field's old → new value."""
    if limit is None or limit.pk is None:
        return "No changes yet."
    # One record more than shown, so the oldest shown change has something to diff against.
    records = list(
        limit.history.select_related("history_user").order_by("-history_date", "-history_id")[
            : shown + 1
        ]
    )
    rows = []
    for newer, older in zip(records, [*records[1:], None], strict=True):
        if len(rows) == shown:
            break
        if older is None:
            if newer.history_type != "+":
                break  # the record before it exists but was not fetched
            changes = [
                (SendLimit._meta.get_field(name).verbose_name, None, getattr(newer, name))
                for name in SEND_LIMIT_FIELDS
            ]
        else:
            delta = newer.diff_against(older, included_fields=SEND_LIMIT_FIELDS)
            changes = [
                (SendLimit._meta.get_field(c.field).verbose_name, c.old, c.new)
                for c in delta.changes
            ]
            if not changes:
                continue  # a save that changed nothing
        rows.append(
            {
                "when": newer.history_date,
                "who": newer.history_user,
                "kind": newer.get_history_type_display(),
                "changes": changes,
                "reason": newer.history_change_reason,
            }
        )
    return render_to_string(
        "admin/customers/sendlimit/changes.html",
        {
            "rows": rows,
            "history_url": reverse("admin:customers_sendlimit_history", args=[limit.pk]),
            "change_url": reverse("admin:customers_sendlimit_change", args=[limit.pk]),
        },
    )


class ProviderKindFilter(admin.ChoicesFieldListFilter):
    title = "provider kind"


class CustomerAdmin(admin.ModelAdmin):
    class Media:
        css = {"all": ("emailops/admin.css",)}  # the send limit's history table

    list_display = (
        "name",
        "slug",
        "provider_account",
        "per_minute",
        "max_workers",
        "messages_sending",
        "is_active",
    )
    list_filter = ("is_active", ("provider_account__kind", ProviderKindFilter))
    search_fields = ("name", "slug")
    list_select_related = ("provider_account",)
    ordering = ("name",)
    prepopulated_fields = {"slug": ("name",)}
    inlines = [SendLimitInline]
    readonly_fields = ("send_limit_changes", "created_at", "updated_at")
    fieldsets = [
        (None, {"fields": ["name", "slug", "is_active", "provider_account", "time_zone"]}),
        ("Sender", {"fields": ["default_from_email", "default_reply_to", "dkim_selector"]}),
        ("Alerts", {"fields": ["alert_email"]}),
        (
            "Automatic halt",
            {
                "fields": ["halt_bounce_percent", "halt_complaint_percent", "halt_window"],
                "description": "A sending message pauses itself, and says why on its page, when "
                "the providers report this many hard bounces or spam complaints among its last "
                "sends.",
            },
        ),
        ("Notes", {"fields": ["notes"]}),
        ("Send limit history", {"fields": ["send_limit_changes"]}),
        ("Record", {"fields": ["created_at", "updated_at"], "classes": ["collapse"]}),
    ]

    def get_queryset(self, request):
        # One query for the whole page: limits joined in, messages sending counted.
        return (
            super()
            .get_queryset(request)
            .annotate(
                limit_per_minute=F("send_limit__per_minute"),
                limit_max_workers=F("send_limit__max_workers"),
                n_sending=Count("messages", filter=Q(messages__status="sending")),
            )
        )

    def get_urls(self):
        return [
            path(
                "<path:object_id>/domain/",
                self.admin_site.admin_view(self.domain_check_view),
                name="customers_customer_domain",
            ),
            *super().get_urls(),
        ]

    def domain_check_view(self, request, object_id):
        """SPF, DKIM and DMARC for the customer's from-domain, looked up now (a few DNS
        queries, each bounded by DNS_TIMEOUT_S): read only, so a GET."""
        customer = self.get_object(request, unquote(object_id))
        if customer is None:
            raise Http404("No such customer.")
        if not self.has_view_permission(request, customer):
            raise PermissionDenied
        domain = domain_check.from_domain(customer.default_from_email)
        report = domain_check.check_domain(domain, customer.dkim_selector)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "original": customer,
            "title": f"Sending domain of {customer}",
            "report": report,
            "has_change_permission": self.has_change_permission(request, customer),
        }
        return TemplateResponse(request, "admin/customers/customer/domain_check.html", context)

    def get_fieldsets(self, request, obj=None):
        if obj is None:
            return [fs for fs in self.fieldsets if fs[0] != "Send limit history"]
        return self.fieldsets

    @admin.display(description="Limit/min", ordering="limit_per_minute")
    def per_minute(self, obj):
        return obj.limit_per_minute

    @admin.display(description="Max workers", ordering="limit_max_workers")
    def max_workers(self, obj):
        return obj.limit_max_workers

    @admin.display(description="Messages sending", ordering="n_sending")
    def messages_sending(self, obj):
        if not obj.n_sending:
            return 0
        url = reverse("admin:sending_message_changelist")
        return format_html(
            '<a href="{}?customer__id__exact={}&amp;status__exact=sending">{}</a>',
            url,
            obj.pk,
            obj.n_sending,
        )

    @admin.display(description="Changes")
    def send_limit_changes(self, obj):
        limit = SendLimit.objects.filter(customer=obj).first() if obj and obj.pk else None
        return send_limit_changes_html(limit)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        # An untouched inline is not saved: every customer still gets its one SendLimit.
        send_limit_ensure(customer=form.instance)


admin.site.register(Customer, CustomerAdmin)


@admin.register(SendLimit)
class SendLimitAdmin(AuditedAdmin):
    """Send limits on their own: operators may change these, but not the customer."""

    class Media:
        css = {"all": ("emailops/admin.css",)}

    list_display = (
        "customer",
        "per_minute",
        "account_cap",
        "max_workers",
        "batch_size",
        "concurrency",
        "guard_ms",
        "paused",
    )
    list_filter = ("paused",)
    list_select_related = ("customer__provider_account",)
    search_fields = ("customer__name", "customer__slug")
    ordering = ("customer__name",)
    readonly_fields = ("customer", "account_cap", "changes")
    fieldsets = [
        (None, {"fields": ["customer", "account_cap"]}),
        ("Limits", {"fields": list(SEND_LIMIT_FIELDS)}),
        ("Recent changes", {"fields": ["changes"]}),
    ]

    def has_add_permission(self, request):
        return False  # created with its customer

    def has_delete_permission(self, request, obj=None):
        return False  # every customer keeps exactly one

    @admin.display(description="Account cap/min")
    def account_cap(self, obj):
        account = obj.customer.provider_account
        return account.per_minute_cap if account else "—"

    @admin.display(description="Changes")
    def changes(self, obj):
        return send_limit_changes_html(obj)


# Suppressions: customers/suppression_admin.py (imported here so that it registers).
from . import suppression_admin  # noqa: E402, F401
