"""The messages' admin: editing drafts, the send buttons and their confirmation pages, the
preview, and the list's progress."""

from django.contrib import admin
from django.contrib import messages as flash
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from .. import services, tracking
from ..models import Message, Recipient
from ..permissions import may_watch
from ..selectors import (
    message_preview,
    messages_with_progress,
    progress_of,
)
from .schedule import ScheduleActions
from .unknowns import UnknownRecipientsMixin

# A <progress> element rather than a div sized by style="…": the site's CSP allows no inline style.
PROGRESS_BAR = (
    '<progress class="emailops-progress" max="{total}" value="{done}" '
    'title="{done} of {total} finished"></progress> {rounded}%'
)


# What the confirmation pages read of each message's customer.
PLAN_RELATED = ("customer__send_limit", "customer__provider_account")

# A message whose send has started has no field left to edit: its page offers Close, not Save.
FROZEN_SUBMIT_ROW = {
    "show_save": False,
    "show_save_and_continue": False,
    "show_save_and_add_another": False,
}


def recipients_url(message_id, **filters) -> str:
    query = "&".join(
        [f"message__id__exact={message_id}"] + [f"{key}={value}" for key, value in filters.items()]
    )
    return f"{reverse('admin:sending_recipient_changelist')}?{query}"


# Messages ---------------------------------------------------------------------------------------


@admin.register(Message)
class MessageAdmin(UnknownRecipientsMixin, ScheduleActions, admin.ModelAdmin):
    list_display = (
        "subject",
        "customer",
        "status",
        "starts",
        "recipient_total",
        "recipient_counts",
        "progress",
        "created_at",
    )
    list_filter = ("status", "customer")
    list_select_related = ("customer",)
    date_hierarchy = "created_at"
    search_fields = ("subject",)
    ordering = ("-created_at", "-id")
    list_per_page = 50
    # Facet counts would run the progress subqueries over every message.
    show_facets = admin.ShowFacets.NEVER
    autocomplete_fields = ("customer",)
    fieldsets = [
        (None, {"fields": ["customer", "subject", "from_email", "reply_to"]}),
        ("Body", {"fields": ["text_body", "html_body"]}),
        (
            "Schedule and status",
            {"fields": ["status", "scheduled_for", "started_at", "completed_at"]},
        ),
        (
            "Record",
            {
                "fields": ["created_by", "created_at", "updated_at", "purged_at"],
                "classes": ["collapse"],
            },
        ),
    ]
    # Status moves only through the send actions; these are written by the system.
    system_fields = (
        "status",
        "scheduled_for",  # set by the Schedule page, in the customer's time zone
        "started_at",
        "completed_at",
        "created_by",
        "created_at",
        "updated_at",
        "purged_at",
    )

    actions = ["send_now", "pause", "resume", "cancel", "retry_unknown", "unschedule"]
    # What the change page's buttons and the list's actions do: (service, permission, done text).
    SEND_ACTIONS = {
        "send": (services.message_start, "start_message", "Sending started"),
        "pause": (services.message_pause, "pause_message", "Paused"),
        "resume": (services.message_resume, "resume_message", "Resumed"),
        "cancel": (services.message_cancel, "cancel_message", "Cancelled"),
    }

    def get_queryset(self, request):
        return messages_with_progress(super().get_queryset(request))

    def _may(self, request, perm: str) -> bool:
        return request.user.has_perm(f"sending.{perm}")

    def has_start_message_permission(self, request):
        return self._may(request, "start_message")

    def has_pause_message_permission(self, request):
        return self._may(request, "pause_message")

    def has_resume_message_permission(self, request):
        return self._may(request, "resume_message")

    def has_cancel_message_permission(self, request):
        return self._may(request, "cancel_message")

    def _run(self, request, action: str, message_ids) -> None:
        service, _, done = self.SEND_ACTIONS[action]
        for message_id in message_ids:
            try:
                service(message_id=message_id, user=request.user)
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), flash.ERROR)
            else:
                self.message_user(request, f"{done}: message {message_id}.", flash.SUCCESS)

    @admin.action(description="Send now", permissions=["start_message"])
    def send_now(self, request, queryset):
        if request.POST.get("post") != "yes":
            return self.confirmation(request, "send", list(queryset.select_related(*PLAN_RELATED)))
        self._run(request, "send", queryset.values_list("pk", flat=True))

    @admin.action(description="Pause sending", permissions=["pause_message"])
    def pause(self, request, queryset):
        self._run(request, "pause", queryset.values_list("pk", flat=True))

    @admin.action(description="Resume sending", permissions=["resume_message"])
    def resume(self, request, queryset):
        self._run(request, "resume", queryset.values_list("pk", flat=True))

    @admin.action(
        description="Cancel (recipients not yet sent are cancelled)", permissions=["cancel_message"]
    )
    def cancel(self, request, queryset):
        if request.POST.get("post") != "yes":
            return self.confirmation(
                request, "cancel", list(queryset.select_related(*PLAN_RELATED))
            )
        self._run(request, "cancel", queryset.values_list("pk", flat=True))

    def confirmation(self, request, action: str, messages, *, from_page: bool = False):
        """Like Django's delete confirmation: what Send now or Cancel will do, and a button
        that does it (posting back with post=yes)."""
        from ..confirm import cancel_plan, send_plan

        plans = [send_plan(m) if action == "send" else cancel_plan(m) for m in messages]
        verb = "Send now" if action == "send" else "Cancel"
        context = {
            **self.admin_site.each_context(request),
            "title": f"{verb}: are you sure?",
            "opts": self.opts,
            "action": action,
            "plans": plans,
            "from_page": from_page,
            "ok": any(not getattr(p, "problems", ()) for p in plans),
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            "changelist_action": "send_now" if action == "send" else "cancel",
            "back_url": (
                reverse("admin:sending_message_change", args=[messages[0].pk])
                if from_page
                else reverse("admin:sending_message_changelist")
            ),
            "live_url": reverse("admin:sending_live_customer", args=[messages[0].customer_id])
            if len({m.customer_id for m in messages}) == 1
            else "",
        }
        return TemplateResponse(request, "admin/sending/message/confirm.html", context)

    def send_action_view(self, request, object_id, action):
        """The change page's Send now / Pause / Resume / Cancel buttons (POST only)."""
        if request.method != "POST" or action not in self.SEND_ACTIONS:
            raise PermissionDenied
        if not self._may(request, self.SEND_ACTIONS[action][1]):
            raise PermissionDenied
        message = self.get_object(request, unquote(object_id))
        if message is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if action in ("send", "cancel") and request.POST.get("post") != "yes":
            return self.confirmation(request, action, [message], from_page=True)
        self._run(request, action, [message.pk])
        return HttpResponseRedirect(reverse("admin:sending_message_change", args=[message.pk]))

    def _send_buttons(self, request, message) -> list[tuple[str, str, str]]:
        """(label, url, css class) for what this user may do to this message now."""
        by_status = {
            Message.Status.DRAFT: ["send", "cancel"],
            Message.Status.SCHEDULED: ["send", "cancel"],
            Message.Status.SENDING: ["pause", "cancel"],
            Message.Status.PAUSED: ["resume", "cancel"],
        }
        # (label, css): starting and resuming look like the page's main action; cancel like delete.
        looks = {
            "send": ("Send now", "default"),
            "pause": ("Pause", ""),
            "resume": ("Resume", "default"),
            "cancel": ("Cancel send", "cancel"),
        }
        return [
            (
                looks[action][0],
                reverse("admin:sending_message_action", args=[message.pk, action]),
                looks[action][1],
            )
            for action in by_status.get(message.status, [])
            if self._may(request, self.SEND_ACTIONS[action][1])
        ]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return self.system_fields
        if obj.is_content_frozen:
            # Once a send starts every recipient must get the same message.
            return ("customer", *Message.CONTENT_FIELDS, *self.system_fields)
        return ("customer", *self.system_fields)

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.status in (Message.Status.SENDING, Message.Status.PAUSED):
            return False  # workers may hold its recipients: cancel it first
        return super().has_delete_permission(request, obj)

    def get_deleted_objects(self, objs, request):
        # Django's default lists every recipient on the confirmation page; count them instead.
        messages = list(objs)
        n_recipients = Recipient.objects.filter(message__in=messages).count()
        to_delete = [
            format_html(
                'Message: <a href="{}">{}</a>',
                reverse("admin:sending_message_change", args=[message.pk]),
                message,
            )
            for message in messages
        ]
        if n_recipients:
            to_delete.append([f"{n_recipients} recipients"])
        model_count = {"messages": len(messages), "recipients": n_recipients}
        perms_needed = set()
        if n_recipients and not request.user.has_perm("sending.delete_recipient"):
            perms_needed.add("recipient")
        # Bulk deletion checks no object permission: a running send blocks it here instead.
        protected = [
            f"{message} ({message.get_status_display().lower()}: cancel it first)"
            for message in messages
            if message.status in (Message.Status.SENDING, Message.Status.PAUSED)
        ]
        return to_delete, model_count, perms_needed, protected

    def save_model(self, request, obj, form, change):
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)

    def get_urls(self):
        urls = [
            path(
                "<path:object_id>/import/",
                self.admin_site.admin_view(self.import_view),
                name="sending_message_import",
            ),
            path(
                "<path:object_id>/preview.html",
                self.admin_site.admin_view(self.preview_view),
                name="sending_message_preview",
            ),
            path(
                "<path:object_id>/action/<str:action>/",
                self.admin_site.admin_view(self.send_action_view),
                name="sending_message_action",
            ),
        ]
        # Before the defaults: their "<path:object_id>/" would swallow ".../import/".
        return urls + self.unknown_urls() + self.schedule_urls() + super().get_urls()

    def preview_view(self, request, object_id):
        """The HTML body as its first recipient gets it, for the message page's sandboxed iframe.

        A page of its own rather than the iframe's srcdoc: a srcdoc document inherits the message
        page's Content-Security-Policy, which allows no inline style, and emails are made of
        inline styles. This response has its own policy: nothing runs (sandbox, no script-src),
        styles inline, images from anywhere (as the recipient's mail client shows them).
        """
        message = self.get_object(request, unquote(object_id))
        if message is None:
            raise Http404
        preview = message_preview(message=message)
        response = HttpResponse(preview.html or "", content_type="text/html; charset=utf-8")
        response["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; img-src * data:; font-src * data:; "
            "sandbox"
        )
        response["Referrer-Policy"] = "no-referrer"
        response["X-Frame-Options"] = "SAMEORIGIN"
        return response

    def import_view(self, request, object_id):
        # Imported here: the import module loads the CSV machinery only when it is used.
        from .recipient_import import import_recipients_view

        return import_recipients_view(request, object_id, model_admin=self)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        # get_object() reads through get_queryset(): the progress counts come with the message.
        message = self.get_object(request, unquote(object_id))
        if message is not None:
            can_import = not message.is_content_frozen and request.user.has_perms(
                ("sending.add_recipient", "sending.change_message")
            )
            progress = progress_of(message)
            extra_context = {
                "preview": message_preview(message=message),
                "progress": progress,
                "status_links": [
                    (
                        label,
                        progress.by_status[status],
                        recipients_url(message.pk, status__exact=status),
                    )
                    for status, label in Recipient.Status.choices
                    if progress.by_status.get(status)
                ],
                "recipients_url": recipients_url(message.pk),
                "preview_url": reverse("admin:sending_message_preview", args=[message.pk]),
                "send_buttons": self._send_buttons(request, message),
                "tracking": tracking.counts(message.pk),
                "live_url": (
                    reverse("admin:sending_live_customer", args=[message.customer_id])
                    if may_watch(request.user)
                    else ""
                ),
                "live_ws": (
                    f"/ws/live/customer/{message.customer_id}/"
                    if may_watch(request.user)
                    and message.status in (Message.Status.SENDING, Message.Status.PAUSED)
                    else ""
                ),
                "import_url": (
                    reverse("admin:sending_message_import", args=[message.pk]) if can_import else ""
                ),
                **self.unknown_context(
                    request, message, progress.by_status.get(Recipient.Status.UNKNOWN, 0)
                ),
                **self.schedule_context(request, message),
                **(FROZEN_SUBMIT_ROW if message.is_content_frozen else {}),
                **(extra_context or {}),
            }
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.display(description="Recipients")
    def recipient_total(self, obj):
        return format_html('<a href="{}">{}</a>', recipients_url(obj.pk), progress_of(obj).total)

    @admin.display(description="By status")
    def recipient_counts(self, obj):
        progress = progress_of(obj)
        shown = [
            (recipients_url(obj.pk, status__exact=status), label, progress.by_status[status])
            for status, label in Recipient.Status.choices
            if progress.by_status[status]
        ]
        if not shown:
            return "—"
        return format_html_join(" · ", '<a href="{}" class="emailops-count">{}&nbsp;{}</a>', shown)

    @admin.display(description="Progress")
    def progress(self, obj):
        progress = progress_of(obj)
        return format_html(
            PROGRESS_BAR,
            rounded=f"{progress.percent:.0f}",
            done=progress.terminal,
            total=max(progress.total, 1),
        )
