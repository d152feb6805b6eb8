"""The admin page that imports recipients from a CSV file into one message.

MessageAdmin mounts it in get_urls() at "<path:object_id>/import/", named
"sending_message_import", wrapped in admin_site.admin_view(), through a method that calls
`import_recipients_view(request, object_id, model_admin=self)`. The view stays a thin adapter
around sending.imports.import_recipients.
"""

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.admin import ModelAdmin
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse

from ..imports import ImportRejected, ImportResult, import_recipients

REQUIRED_PERMISSIONS = ("sending.add_recipient", "sending.change_message")
LISTED_DUPLICATE_LINES = 20


class RecipientImportForm(forms.Form):
    file = forms.FileField(
        label="CSV file",
        help_text="UTF-8, with a header line that names an “email” column.",
        widget=forms.ClearableFileInput(attrs={"accept": ".csv,text/csv"}),
    )


def import_recipients_view(
    request: HttpRequest, message_id: str, *, model_admin: ModelAdmin
) -> HttpResponse:
    """GET shows the form; POST imports, then redirects to the message, or answers 400."""
    if not request.user.has_perms(REQUIRED_PERMISSIONS):
        raise PermissionDenied
    message = model_admin.get_object(request, unquote(message_id))
    if message is None:
        raise Http404("No such message.")

    rejected: ImportRejected | None = None
    if request.method == "POST":
        form = RecipientImportForm(request.POST, request.FILES)
        if form.is_valid():
            upload = form.cleaned_data["file"]
            try:
                result = import_recipients(message=message, file=upload, user=request.user)
            except ImportRejected as exc:
                rejected = exc
            else:
                summary = _summary(result, filename=upload.name)
                model_admin.log_change(request, message, summary)
                level = messages.SUCCESS if result.imported else messages.WARNING
                messages.add_message(request, level, summary)
                return HttpResponseRedirect(
                    reverse(
                        f"{model_admin.admin_site.name}:sending_message_change",
                        args=[quote(message.pk)],
                        current_app=model_admin.admin_site.name,
                    )
                )
    else:
        form = RecipientImportForm()

    opts = model_admin.model._meta
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Import recipients",
        "subtitle": str(message),
        "opts": opts,
        "original": message,
        "has_view_permission": model_admin.has_view_permission(request, message),
        "form": form,
        "rejected": rejected,
        "frozen": message.is_content_frozen,
        "max_bytes": settings.RECIPIENT_IMPORT_MAX_BYTES,
        "media": model_admin.media + form.media,
    }
    return TemplateResponse(
        request,
        f"admin/{opts.app_label}/{opts.model_name}/import_recipients.html",
        context,
        status=400 if request.method == "POST" else 200,
    )


def _summary(result: ImportResult, *, filename: str) -> str:
    text = f"Imported {_count(result.imported, 'recipient')} from {filename}."
    if result.duplicates:
        listed = ", ".join(str(line) for line in result.duplicate_lines[:LISTED_DUPLICATE_LINES])
        if result.duplicates > LISTED_DUPLICATE_LINES:
            listed += f" and {result.duplicates - LISTED_DUPLICATE_LINES} more"
        where = "line" if result.duplicates == 1 else "lines"
        text += f" Skipped {_count(result.duplicates, 'duplicate')} ({where} {listed})."
    return text


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"
