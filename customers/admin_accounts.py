"""The provider accounts' admin: credentials write-only (typed in, never shown back), stored
encrypted or held by reference (an ARN), entered again whenever the account's destination
changes, and every change kept in the account's history (who, when, why) without them."""

import json

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import Count
from django.utils.html import format_html, format_html_join

from .admin_history import AuditedAdmin
from .models import ProviderAccount, SendLimit, validate_credentials_ref
from .services import provider_account_save


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
    new_credentials_ref = forms.CharField(
        label="Or credentials by reference",
        required=False,
        strip=True,
        max_length=2048,
        widget=forms.TextInput(attrs={"size": 80, "autocomplete": "off", "spellcheck": "false"}),
        help_text="The ARN of a Secrets Manager secret or an SSM parameter holding them as a "
        "JSON object: Lambda workers read it themselves, so the credentials never travel.",
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
                f"a JSON object such as {example}. Stored values are never shown. Changing the "
                "kind, host, port, TLS, endpoint, region or API URL needs them entered again."
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

    def clean_new_credentials_ref(self):
        ref = self.cleaned_data["new_credentials_ref"]
        if ref:
            validate_credentials_ref(ref)
        return ref

    def clean(self):
        cleaned = super().clean()
        entered = [
            bool(cleaned.get("new_credentials")),
            bool(cleaned.get("new_credentials_ref")),
            bool(cleaned.get("clear_credentials")),
        ]
        if sum(entered) > 1:
            raise ValidationError(
                "Enter new credentials, or a reference, or remove the stored ones: one of them."
            )
        if any(entered):
            # Before the model's own validation (ModelForm._post_clean): it checks that a change
            # of destination comes with credentials entered again.
            self.instance.enter_credentials(
                credentials=cleaned.get("new_credentials"),
                ref=cleaned.get("new_credentials_ref") or "",
            )
        return cleaned


@admin.register(ProviderAccount)
class ProviderAccountAdmin(AuditedAdmin):
    form = ProviderAccountForm
    list_display = ("name", "kind", "per_minute_cap", "customer_count", "updated_at")
    list_filter = ("kind",)
    search_fields = ("name",)
    ordering = ("name",)
    readonly_fields = (
        "stored_credentials",
        "credentials_changed_at",
        "sharing",
        "created_at",
        "updated_at",
    )

    def get_fieldsets(self, request, obj=None):
        credentials = ["new_credentials", "new_credentials_ref"]
        if obj is not None:
            credentials = [
                "stored_credentials",
                "credentials_changed_at",
                "new_credentials",
                "new_credentials_ref",
                "clear_credentials",
            ]
        return [
            (None, {"fields": ["name", "kind", "per_minute_cap", "settings"]}),
            ("Credentials", {"fields": credentials}),
            ("Customers", {"fields": ["sharing"]}),
            ("Record", {"fields": ["created_at", "updated_at"], "classes": ["collapse"]}),
        ]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(n_customers=Count("customers"))

    def save_model(self, request, obj, form, change):
        provider_account_save(account=obj, user=request.user)

    @admin.display(description="Customers", ordering="n_customers")
    def customer_count(self, obj):
        return obj.n_customers

    @admin.display(description="Customers sending through it")
    def sharing(self, obj):
        """Each customer's own limit and their sum against the account's cap: pacing holds the
        cap across all of them (docs/pacing.md, "Shared provider accounts")."""
        limits = list(
            SendLimit.objects.filter(customer__provider_account=obj)
            .select_related("customer")
            .order_by("customer__name")
        )
        if not limits:
            return "None yet."
        combined = sum(limit.per_minute for limit in limits)
        rows = format_html_join(
            "", "<li>{} — {}/min</li>", ((x.customer.name, x.per_minute) for x in limits)
        )
        note = f"Combined {combined}/min against a cap of {obj.per_minute_cap}/min: " + (
            "while several have backlog each gets at least an equal share of the cap."
            if combined > obj.per_minute_cap
            else "within the cap."
        )
        return format_html("<ul>{}</ul><p>{}</p>", rows, note)

    @admin.display(description="Stored credentials")
    def stored_credentials(self, obj):
        # Names only: enough to see what is configured, never a value.
        if obj.credentials_ref:
            return f"By reference: {obj.credentials_ref}"
        if not obj.credentials:
            return "None stored."
        return f"{', '.join(sorted(obj.credentials))} (values hidden)"
