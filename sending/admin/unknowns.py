"""The message admin's recipients in doubt (`unknown`): "Retry unknown", on the message page and
as a list action, always through a confirmation page that says how many may get the email twice;
and the link to export who they are (the delivery log export, filtered to them).

A mixin of MessageAdmin (sending/admin/messages.py), kept apart so that page stays readable.
"""

from django.contrib import admin
from django.contrib import messages as flash
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from .. import services
from ..confirm import retry_unknown_plan
from ..models import Message, Recipient
from .recipients import EXPORT_PERMISSION

RETRY_PERMISSION = "sending.start_message"  # a retry sends: who may start a send may retry


def unknown_export_url(message_id: int) -> str:
    """The delivery log export (CSV) of the message's unknown recipients."""
    query = f"message__id__exact={message_id}&status__exact={Recipient.Status.UNKNOWN}"
    return f"{reverse('admin:sending_recipient_export')}?{query}"


class UnknownRecipientsMixin:
    def unknown_urls(self) -> list:
        return [
            path(
                "<path:object_id>/retry-unknown/",
                self.admin_site.admin_view(self.retry_unknown_view),
                name="sending_message_retry_unknown",
            ),
        ]

    def unknown_context(self, request, message: Message, unknown: int) -> dict:
        """What the message page shows about its unknown recipients, for this user."""
        if not unknown:
            return {}
        user = request.user
        retry = user.has_perm(RETRY_PERMISSION) and message.status in (
            Message.Status.SENDING,
            Message.Status.PAUSED,
            Message.Status.COMPLETED,
        )
        return {
            "unknown_count": unknown,
            "retry_unknown_url": (
                reverse("admin:sending_message_retry_unknown", args=[message.pk]) if retry else ""
            ),
            "unknown_export_url": (
                unknown_export_url(message.pk) if user.has_perm(EXPORT_PERMISSION) else ""
            ),
        }

    def has_retry_unknown_permission(self, request):
        return request.user.has_perm(RETRY_PERMISSION)

    @admin.action(description="Retry unknown recipients…", permissions=["retry_unknown"])
    def retry_unknown(self, request, queryset):
        if request.POST.get("post") != "yes":
            return self.retry_unknown_confirmation(request, list(queryset))
        for message_id in queryset.values_list("pk", flat=True):
            self._retry_unknown(request, message_id)

    def retry_unknown_view(self, request, object_id):
        """The message page's Retry unknown button (POST only): the confirmation, then the retry."""
        if request.method != "POST" or not self.has_retry_unknown_permission(request):
            raise PermissionDenied
        message = self.get_object(request, unquote(object_id))
        if message is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if request.POST.get("post") != "yes":
            return self.retry_unknown_confirmation(request, [message], from_page=True)
        self._retry_unknown(request, message.pk)
        return HttpResponseRedirect(reverse("admin:sending_message_change", args=[message.pk]))

    def _retry_unknown(self, request, message_id: int) -> None:
        try:
            requeued = services.message_retry_unknown(message_id=message_id, user=request.user)
        except ValidationError as exc:
            self.message_user(request, " ".join(exc.messages), flash.ERROR)
        else:
            self.message_user(
                request,
                f"Queued again: {requeued} unknown recipient{'s' if requeued != 1 else ''} of "
                f"message {message_id}.",
                flash.SUCCESS,
            )

    def retry_unknown_confirmation(self, request, messages, *, from_page: bool = False):
        plans = [retry_unknown_plan(m) for m in messages]
        context = {
            **self.admin_site.each_context(request),
            "title": "Retry unknown recipients: are you sure?",
            "opts": self.opts,
            "plans": plans,
            "duplicates": sum(p.unknown for p in plans if not p.problems),
            "from_page": from_page,
            "ok": any(not p.problems for p in plans),
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            "back_url": (
                reverse("admin:sending_message_change", args=[messages[0].pk])
                if from_page
                else reverse("admin:sending_message_changelist")
            ),
        }
        return TemplateResponse(
            request, "admin/sending/message/confirm_retry_unknown.html", context
        )
