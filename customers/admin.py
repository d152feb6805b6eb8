import json

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, F, Q
from django.forms.models import BaseInlineFormSet
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.html import format_html
from simple_history.admin import SimpleHistoryAdmin

from .models import Customer, ProviderAccount, SendLimit
from .services import send_limit_ensure, send_limit_fits_account

SEND_LIMIT_FIELDS = ("per_minute", "max_workers", "batch_size", "concurrency", "guard_ms", "paused")
SEND_LIMIT_CHANGES_SHOWN = 10


# Provider accounts ------------------------------------------------------------------------------


class WriteOnlyTextarea(forms.Textarea):
    """A textarea that never renders a value, like PasswordInput(render_value=False)."""

    def get_context(self, name, value, attrs):
        return super().get_context(name, None, attrs)


class ProviderAccountForm(forms.ModelForm):
    new_credentials = forms.CharField(
        label="Credentials",
        required=False,
        strip=True,
        widget=WriteOnlyTextarea(
            attrs={"rows": 4, "cols": 60, "autocomplete": "off", "spellcheck": "false"}
        ),
    )
    clear_credentials = forms.BooleanField(label="Remove the stored credentials", required=False)

    class Meta:
        model = ProviderAccount
        fields = ["name", "kind", "settings", "per_minute_cap"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        example = '{"username": "…", "password": "…"} or {"api_key": "…"}'
        if self.instance.pk:
            self.fields["new_credentials"].help_text = (
                "Leave blank to keep the stored credentials. Anything entered replaces them all: "
                f"a JSON object such as {example}. Stored values are never shown."
            )
        else:
            self.fields[
                "new_credentials"
            ].help_text = f"A JSON object such as {example}. Encrypted at rest; never shown again."

    def clean_new_credentials(self):
        raw = self.cleaned_data["new_credentials"]
        if not raw:
            return None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            # The decoder's message names a position, never the text: no secret is echoed back.
            raise ValidationError(f"Not valid JSON: {exc.msg} (line {exc.lineno}).") from None
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise ValidationError('Credentials must be a JSON object: {"name": "value", …}.')
        return value

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("clear_credentials") and cleaned.get("new_credentials"):
            raise ValidationError("Either enter new credentials or remove the stored ones.")
        return cleaned

    def save(self, commit=True):
        if self.cleaned_data.get("clear_credentials"):
            self.instance.credentials = {}
        elif self.cleaned_data.get("new_credentials") is not None:
            self.instance.credentials = self.cleaned_data["new_credentials"]
        return super().save(commit)


@admin.register(ProviderAccount)
class ProviderAccountAdmin(admin.ModelAdmin):
    form = ProviderAccountForm
    list_display = ("name", "kind", "per_minute_cap", "customer_count", "updated_at")
    list_filter = ("kind",)
    search_fields = ("name",)
    ordering = ("name",)
    readonly_fields = ("stored_credentials", "created_at", "updated_at")

    def get_fieldsets(self, request, obj=None):
        credentials = ["new_credentials"]
        if obj is not None:
            credentials = ["stored_credentials", "new_credentials", "clear_credentials"]
        return [
            (None, {"fields": ["name", "kind", "per_minute_cap", "settings"]}),
            ("Credentials", {"fields": credentials}),
            ("Record", {"fields": ["created_at", "updated_at"], "classes": ["collapse"]}),
        ]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(n_customers=Count("customers"))

    @admin.display(description="Customers", ordering="n_customers")
    def customer_count(self, obj):
        return obj.n_customers

    @admin.display(description="Stored credentials")
    def stored_credentials(self, obj):
        # Names only: enough to see what is configured, never a value.
        if not obj.credentials:
            return "None stored."
        return f"{', '.join(sorted(obj.credentials))} (values hidden)"


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
        ("Sender", {"fields": ["default_from_email", "default_reply_to"]}),
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
class SendLimitAdmin(SimpleHistoryAdmin):
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
    history_list_per_page = 50

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

    def history_view(self, request, object_id, extra_context=None):
        response = super().history_view(request, object_id, extra_context)
        # django-simple-history's list of versions styles its paginator with a style="…"
        # attribute: allowed here (attributes only, never <style> or script), the one exception
        # to the site's policy.
        response._csp_update = {"style-src-attr": ["'unsafe-inline'"]}
        return response

    def history_form_view(self, request, object_id, version_id, extra_context=None):
        # simple_history saves a revert posted by anyone who may *view* the history; a revert
        # is a change.
        if request.method == "POST":
            obj = self.get_object(request, object_id)
            if obj is None or not self.has_change_permission(request, obj):
                raise PermissionDenied
        return super().history_form_view(request, object_id, version_id, extra_context)


# Suppressions: customers/suppression_admin.py (imported here so that it registers).
from . import suppression_admin  # noqa: E402, F401
