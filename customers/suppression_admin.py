"""The suppression list's admin: the list (add, search, filter), CSV import and export, and
resubscribe with a reason; and the read-only audit of resubscribes. Views are thin adapters
around customers.suppression_csv and customers.suppressions."""

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from sending.imports import ImportRejected

from . import suppression_csv, suppressions
from .models import Customer, Resubscription, Suppression


class SuppressionForm(forms.ModelForm):
    class Meta:
        model = Suppression
        fields = ["customer", "email", "reason", "source"]

    def clean_email(self):
        return self.cleaned_data["email"].strip().lower()

    def clean(self):
        cleaned = super().clean()
        customer, email = cleaned.get("customer"), cleaned.get("email")
        if customer and email:
            duplicates = Suppression.objects.filter(customer=customer, email__iexact=email)
            if self.instance.pk:
                duplicates = duplicates.exclude(pk=self.instance.pk)
            if duplicates.exists():
                self.add_error("email", f"{email} is already suppressed for {customer}.")
        return cleaned


class SuppressionImportForm(forms.Form):
    customer = forms.ModelChoiceField(queryset=Customer.objects.order_by("name"))
    file = forms.FileField(
        label="CSV file",
        help_text="UTF-8, with a header line that names an “email” column (and, if you like, "
        "“reason” and “source”).",
        widget=forms.ClearableFileInput(attrs={"accept": ".csv,text/csv"}),
    )


class ResubscribeForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Why this address may be mailed again (kept in the resubscribe record).",
    )


@admin.register(Suppression)
class SuppressionAdmin(admin.ModelAdmin):
    form = SuppressionForm
    list_display = ("email", "customer", "reason", "source", "created_by", "created_at")
    list_filter = ("reason", "customer")
    list_select_related = ("customer", "created_by")
    search_fields = ("email",)
    search_help_text = "Search by email address (or part of one)."
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    autocomplete_fields = ("customer",)
    readonly_fields = ("created_by", "created_at", "resubscribe_link")
    list_per_page = 100
    actions = ["export_csv"]

    def save_model(self, request, obj, form, change):
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("import/", wrap(self.import_view), name="customers_suppression_import"),
            path(
                "<path:object_id>/resubscribe/",
                wrap(self.resubscribe_view),
                name="customers_suppression_resubscribe",
            ),
            *super().get_urls(),
        ]

    @admin.display(description="Resubscribe")
    def resubscribe_link(self, obj):
        if obj is None or obj.pk is None:
            return "—"
        url = reverse("admin:customers_suppression_resubscribe", args=[obj.pk])
        return format_html('<a class="button" href="{}">Resubscribe this address…</a>', url)

    @admin.action(description="Export the selected suppressions as CSV", permissions=["view"])
    def export_csv(self, request, queryset):
        stamp = timezone.now().strftime("%Y%m%d-%H%M")
        # Built whole: under ASGI Django reads a streaming response's sync iterator to the end
        # before sending anyway (a list of even 100,000 addresses is a few megabytes).
        response = HttpResponse(
            "".join(suppression_csv.export_rows(queryset)), content_type="text/csv; charset=utf-8"
        )
        response["Content-Disposition"] = f'attachment; filename="suppressions-{stamp}.csv"'
        return response

    def get_actions(self, request):
        # Taking addresses off the list goes through Resubscribe (a reason, recorded), never a
        # bulk delete.
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def delete_view(self, request, object_id, extra_context=None):
        return HttpResponseRedirect(
            reverse("admin:customers_suppression_resubscribe", args=[object_id])
        )

    def import_view(self, request):
        if not self.has_add_permission(request):
            raise PermissionDenied
        rejected = None
        form = SuppressionImportForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            customer, upload = form.cleaned_data["customer"], form.cleaned_data["file"]
            try:
                result = suppression_csv.import_suppressions(
                    customer=customer, file=upload, user=request.user
                )
            except ImportRejected as exc:
                rejected = exc
            else:
                text = f"Added {result.imported:,} addresses to {customer}'s suppression list"
                if result.duplicates:
                    text += f"; skipped {result.duplicates:,} already on it or repeated"
                self.message_user(request, text + ".", messages.SUCCESS)
                changelist = reverse("admin:customers_suppression_changelist")
                return HttpResponseRedirect(f"{changelist}?customer__id__exact={customer.pk}")
        return self._page(
            request,
            "admin/customers/suppression/import.html",
            {
                "title": "Import suppressions",
                "form": form,
                "rejected": rejected,
                "max_bytes": settings.RECIPIENT_IMPORT_MAX_BYTES,
            },
            status=400 if request.method == "POST" else 200,
        )

    def resubscribe_view(self, request, object_id):
        row = self.get_object(request, unquote(object_id))
        if row is None:
            raise Http404("This address is not on the suppression list.")
        if not self.has_delete_permission(request, row):
            raise PermissionDenied
        form = ResubscribeForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                suppressions.resubscribe(
                    suppression_id=row.pk, reason=form.cleaned_data["reason"], user=request.user
                )
            except ValidationError as exc:
                form.add_error(None, exc)
            else:
                self.message_user(
                    request,
                    f"{row.customer} may mail {row.email} again (taken off its suppression list).",
                    messages.SUCCESS,
                )
                return HttpResponseRedirect(reverse("admin:customers_suppression_changelist"))
        return self._page(
            request,
            "admin/customers/suppression/resubscribe.html",
            {"title": f"Resubscribe {row.email}", "form": form, "original": row},
            status=400 if request.method == "POST" else 200,
        )

    def _page(self, request, template, context, *, status):
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "has_view_permission": self.has_view_permission(request),
            "media": self.media + context["form"].media,
            **context,
        }
        return TemplateResponse(request, template, context, status=status)


@admin.register(Resubscription)
class ResubscriptionAdmin(admin.ModelAdmin):
    """Who took which address off a list, when and why: read only."""

    list_display = ("email", "customer", "reason", "suppressed_reason", "created_by", "created_at")
    list_filter = ("customer",)
    list_select_related = ("customer", "created_by")
    search_fields = ("email",)
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
