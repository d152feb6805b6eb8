from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.functions import Lower

from customers.models import Customer

from .rendering import compile_message


class Message(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        SCHEDULED = "scheduled", "Scheduled"
        SENDING = "sending", "Sending"
        PAUSED = "paused", "Paused"
        COMPLETED = "completed", "Completed"
        CANCELLED = "cancelled", "Cancelled"

    EDITABLE_STATUSES = (Status.DRAFT, Status.SCHEDULED)
    CONTENT_FIELDS = ("subject", "from_email", "reply_to", "text_body", "html_body")

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="messages")
    subject = models.CharField(max_length=998)
    from_email = models.EmailField(blank=True, help_text="Blank: the customer's default.")
    reply_to = models.EmailField(blank=True, help_text="Blank: the customer's default.")
    text_body = models.TextField(
        blank=True,
        help_text="Plain text. Merge fields: {{ first_name }}; missing ones render empty.",
    )
    html_body = models.TextField(blank=True, help_text="HTML, autoescaped. Merge fields as above.")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    scheduled_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    purged_at = models.DateTimeField(
        null=True, blank=True, help_text="When recipients' addresses and merge data were purged."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [
            ("start_message", "Can start sending a message"),
            ("cancel_message", "Can cancel a message"),
            ("pause_message", "Can pause a sending message"),
            ("resume_message", "Can resume a paused message"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(text_body="", html_body=""), name="message_has_a_body"
            ),
            models.CheckConstraint(
                condition=~models.Q(status="scheduled", scheduled_at__isnull=True),
                name="scheduled_message_has_a_time",
            ),
        ]
        indexes = [models.Index(fields=["customer", "status"])]

    def __str__(self):
        return self.subject

    @property
    def is_content_frozen(self) -> bool:
        """Once a send starts every recipient must get the same message."""
        return self.status not in self.EDITABLE_STATUSES

    def compiled(self):
        return compile_message(
            subject=self.subject, text_body=self.text_body, html_body=self.html_body
        )

    def clean(self):
        if not self.text_body and not self.html_body:
            raise ValidationError("A message needs a text body, an HTML body, or both.")
        if self.status == self.Status.SCHEDULED and not self.scheduled_at:
            raise ValidationError({"scheduled_at": "A scheduled message needs a time."})
        self.compiled()


class Recipient(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        LEASED = "leased", "Leased to a worker"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed"
        UNKNOWN = "unknown", "Unknown (may have been sent)"
        CANCELLED = "cancelled", "Cancelled"
        SUPPRESSED = "suppressed", "Suppressed"

    TERMINAL_STATUSES = (
        Status.SENT,
        Status.FAILED,
        Status.UNKNOWN,
        Status.CANCELLED,
        Status.SUPPRESSED,
    )

    id = models.BigAutoField(primary_key=True)
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="recipients")
    email = models.EmailField(max_length=254)
    merge_data = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED)
    attempts = models.PositiveSmallIntegerField(default=0)
    provider_message_id = models.CharField(max_length=255, blank=True, db_index=True)
    last_error = models.TextField(blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                "message", Lower("email"), name="recipient_unique_message_email"
            ),
        ]
        indexes = [
            # The claim path: the queued recipients of a message, in id order.
            models.Index(
                fields=["message", "id"],
                condition=models.Q(status="queued"),
                name="recipient_claim_queue",
            ),
            models.Index(fields=["message", "status"], name="recipient_message_status"),
        ]

    def __str__(self):
        return self.email

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL_STATUSES
