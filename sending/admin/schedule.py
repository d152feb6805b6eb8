"""The message pages' planning actions: Schedule / Reschedule (a date and time in the customer's
time zone, with the plan for that time), Unschedule, Test send and Retry failed (a confirmation
page first). A mixin of MessageAdmin, kept apart from its send buttons."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import admin
from django.contrib import messages as flash
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from .. import scheduling, services, testsend
from ..confirm import send_plan
from ..models import Message, Recipient, TestSend

PERM = "sending.start_message"
CHOICES = 200


class ScheduleForm(forms.Form):
    day = forms.DateField(label="Date", widget=forms.DateInput(attrs={"type": "date"}))
    at = forms.TimeField(
        label="Time", widget=forms.TimeInput(attrs={"type": "time"}, format="%H:%M")
    )

    def __init__(self, *args, zone, **kwargs):
        super().__init__(*args, **kwargs)
        self.zone = zone

    def clean(self):
        data = super().clean()
        if "day" in data and "at" in data:
            try:
                data["when"] = scheduling.local_to_utc(data["day"], data["at"], self.zone)
            except ValidationError as exc:
                raise forms.ValidationError(exc.messages) from None
            if data["when"] <= timezone.now():
                raise forms.ValidationError("That time has passed: pick a later one, or Send now.")
        return data


class TestSendForm(forms.Form):
    addresses = forms.CharField(
        label="Send to",
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text=f"Staff addresses (up to {testsend.MAX_ADDRESSES}), by commas or spaces.",
    )
    recipient = forms.ModelChoiceField(
        label="Merge data of",
        queryset=Recipient.objects.none(),
        required=False,
        empty_label="the first recipient",
        help_text="Whose merge fields fill the message.",
    )

    def __init__(self, *args, message, **kwargs):
        super().__init__(*args, **kwargs)
        field = self.fields["recipient"]
        field.queryset = Recipient.objects.filter(message=message)
        # The first CHOICES recipients are offered (a message may have tens of thousands).
        field.choices = [("", field.empty_label)] + [
            (r.pk, r.email) for r in field.queryset.order_by("id")[:CHOICES]
        ]

    def clean_addresses(self):
        try:
            return testsend.parse_addresses(self.cleaned_data["addresses"])
        except ValidationError as exc:
            raise forms.ValidationError(exc.messages) from None


class ScheduleActions:
    """Views and page context for MessageAdmin (which provides get_object, admin_site, …)."""

    def schedule_urls(self):
        views = [
            ("schedule", self.schedule_view),
            ("unschedule", self.unschedule_view),
            ("test-send", self.test_send_view),
            ("retry-failed", self.retry_failed_view),
        ]
        return [
            path(
                f"<path:object_id>/{name}/",
                self.admin_site.admin_view(view),
                name=f"sending_message_{name.replace('-', '_')}",
            )
            for name, view in views
        ]

    def _planning_object(self, request, object_id) -> Message:
        if not request.user.has_perm(PERM):
            raise PermissionDenied
        message = self.get_object(request, unquote(object_id))
        if message is None:
            raise PermissionDenied
        return message

    def _page(self, request, template: str, message: Message, title: str, **context):
        return TemplateResponse(
            request,
            f"admin/sending/message/{template}",
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": title,
                "original": message,
                "zone": message.customer.time_zone,
                "back_url": reverse("admin:sending_message_change", args=[message.pk]),
                **context,
            },
        )

    def _back(self, message: Message):
        return HttpResponseRedirect(reverse("admin:sending_message_change", args=[message.pk]))

    # Schedule / Reschedule / Unschedule ---------------------------------------------------------

    def schedule_view(self, request, object_id):
        message = self._planning_object(request, object_id)
        zone = message.customer.time_zone
        plan = None
        if request.method == "POST":
            form = ScheduleForm(request.POST, zone=zone)
            if form.is_valid():
                when = form.cleaned_data["when"]
                if "schedule" in request.POST:
                    try:
                        services.message_schedule(message_id=message.pk, at=when, user=request.user)
                    except ValidationError as exc:
                        form.add_error(None, exc.messages)
                    else:
                        message.refresh_from_db()
                        self.message_user(
                            request,
                            f"Scheduled: “{message}” {scheduling.describe_start(message)}.",
                            flash.SUCCESS,
                        )
                        return self._back(message)
                plan = send_plan(message, at=when)
        else:
            base = message.scheduled_at or (timezone.now() + timedelta(hours=1))
            local = base.astimezone(zone)
            form = ScheduleForm(initial={"day": local.date(), "at": local.time()}, zone=zone)
            if message.scheduled_at:
                plan = send_plan(message, at=message.scheduled_at)
        verb = "Reschedule" if message.status == Message.Status.SCHEDULED else "Schedule"
        return self._page(
            request,
            "schedule.html",
            message,
            f"{verb} “{message}”",
            form=form,
            plan=plan,
            verb=verb,
            now_there=scheduling.wall_clock(timezone.now(), zone, now=timezone.now()),
            current=scheduling.describe_start(message) if message.scheduled_at else "",
        )

    def unschedule_view(self, request, object_id):
        message = self._planning_object(request, object_id)
        if request.method != "POST":
            raise PermissionDenied
        self._unschedule(request, [message.pk])
        return self._back(message)

    def _unschedule(self, request, message_ids) -> None:
        for message_id in message_ids:
            try:
                services.message_unschedule(message_id=message_id, user=request.user)
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), flash.ERROR)
            else:
                self.message_user(
                    request, f"Unscheduled: message {message_id} is a draft.", flash.SUCCESS
                )

    @admin.action(description="Unschedule (back to draft)", permissions=["start_message"])
    def unschedule(self, request, queryset):
        self._unschedule(request, queryset.values_list("pk", flat=True))

    @admin.display(description="Starts", ordering="scheduled_at")
    def starts(self, obj):
        if obj.status != Message.Status.SCHEDULED or obj.scheduled_at is None:
            return "—"
        return scheduling.describe_start(obj).removeprefix("starts ")

    @admin.display(description="Scheduled for")
    def scheduled_for(self, obj):
        if obj is None or obj.scheduled_at is None:
            return "—"
        zone = obj.customer.time_zone
        return scheduling.wall_clock(obj.scheduled_at, zone, now=obj.scheduled_at, full=True)

    # Test send ------------------------------------------------------------------------------

    def test_send_view(self, request, object_id):
        message = self._planning_object(request, object_id)
        form = TestSendForm(request.POST or None, message=message)
        if request.method == "POST" and form.is_valid():
            recipient = form.cleaned_data["recipient"]
            try:
                record = testsend.send_test(
                    message_id=message.pk,
                    addresses=form.cleaned_data["addresses"],
                    recipient_id=recipient.pk if recipient else None,
                    user=request.user,
                )
            except ValidationError as exc:
                form.add_error(None, exc.messages)
            else:
                level = flash.SUCCESS if record.outcome == TestSend.Outcome.SENT else flash.ERROR
                self.message_user(
                    request,
                    f"Test send {record.get_outcome_display().lower()}: {record.detail}",
                    level,
                )
                return self._back(message)
        return self._page(
            request,
            "test_send.html",
            message,
            f"Test send of “{message}”",
            form=form,
            recent=message.test_sends.all()[:10],
        )

    # Retry failed -------------------------------------------------------------------------------

    def retry_failed_view(self, request, object_id):
        message = self._planning_object(request, object_id)
        if request.method == "POST" and request.POST.get("post") == "yes":
            try:
                n = services.message_retry_failed(message_id=message.pk, user=request.user)
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), flash.ERROR)
            else:
                self.message_user(
                    request, f"Retrying {n} failed recipients of “{message}”.", flash.SUCCESS
                )
            return self._back(message)
        retryable = services.retryable_failures(message.pk).count()
        failed = Recipient.objects.filter(message=message, status=Recipient.Status.FAILED).count()
        return self._page(
            request,
            "retry_failed.html",
            message,
            "Retry failed recipients: are you sure?",
            retryable=retryable,
            permanent=failed - retryable,
            ok=retryable > 0
            and message.status
            in (Message.Status.SENDING, Message.Status.PAUSED, Message.Status.COMPLETED),
        )

    # The message page ---------------------------------------------------------------------------

    def schedule_context(self, request, message: Message) -> dict:
        """What the message page shows and offers of scheduling, testing and retrying."""
        allowed = request.user.has_perm(PERM)
        links = []
        if allowed and message.status in Message.EDITABLE_STATUSES:
            verb = "Reschedule" if message.status == Message.Status.SCHEDULED else "Schedule"
            links.append((f"{verb}…", "schedule"))
        if allowed and message.status != Message.Status.CANCELLED:
            links.append(("Test send…", "test_send"))
        retryable = 0
        if message.status in (
            Message.Status.SENDING,
            Message.Status.PAUSED,
            Message.Status.COMPLETED,
        ):
            retryable = services.retryable_failures(message.pk).count()
            if allowed and retryable:
                links.append((f"Retry {retryable} failed…", "retry_failed"))
        late = scheduling.lateness(message)
        return {
            "planning_links": [
                (label, reverse(f"admin:sending_message_{name}", args=[message.pk]))
                for label, name in links
            ],
            "unschedule_url": (
                reverse("admin:sending_message_unschedule", args=[message.pk])
                if allowed and message.status == Message.Status.SCHEDULED
                else ""
            ),
            "schedule_text": (
                scheduling.describe_start(message)
                if message.status == Message.Status.SCHEDULED
                else ""
            ),
            "started_late": (
                format_html(
                    "Scheduled for {}, it started {} late.",
                    scheduling.wall_clock(
                        message.scheduled_at, message.customer.time_zone, now=message.started_at
                    ),
                    scheduling.until(late),
                )
                if late is not None and late > scheduling.LATE_AFTER_S
                else ""
            ),
        }
