"""What is sent and the engine's state: Message, Recipient, Worker, Lease, CustomerMinute,
ConductorLease, CustomerPacing, TestSend; and what providers told us afterwards: TrackingEvent."""

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
        help_text="Plain text. Merge fields: {{ first_name }}; missing ones render empty. "
        "{{ unsubscribe_url }} is the recipient's own one-click unsubscribe link.",
    )
    html_body = models.TextField(blank=True, help_text="HTML, autoescaped. Merge fields as above.")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    scheduled_at = models.DateTimeField(null=True, blank=True)
    start_problem = models.TextField(
        blank=True,
        editable=False,
        help_text="Why its scheduled start failed (it went back to draft); cleared once it starts.",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    halt_reason = models.TextField(
        blank=True,
        help_text="Why the message paused itself (bounce or complaint rate), when it did.",
    )
    purged_at = models.DateTimeField(
        null=True, blank=True, help_text="When recipients' addresses and merge data were purged."
    )
    claim_after = models.BigIntegerField(
        default=0, editable=False, help_text="Keyset cursor: recipients up to this id were claimed."
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
    # No index of its own: every recipient index starts with message_id. Each index costs on every
    # status change (a status change is never a HOT update), so recipients carry only those that
    # earn their keep.
    message = models.ForeignKey(
        Message, on_delete=models.CASCADE, related_name="recipients", db_index=False
    )
    email = models.EmailField(max_length=254)
    merge_data = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED)
    attempts = models.PositiveSmallIntegerField(default=0)
    provider_message_id = models.CharField(max_length=255, blank=True)
    last_error = models.TextField(blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        permissions = [
            # Delivery logs carry addresses and outcomes: exporting one is its own right, and
            # recorded (sending.admin.recipients).
            ("export_recipients", "Can export delivery logs"),
        ]
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
            # Bounce and complaint webhooks look recipients up by the provider's id.
            models.Index(
                fields=["provider_message_id"],
                condition=~models.Q(provider_message_id=""),
                name="recipient_provider_id",
            ),
        ]

    def __str__(self):
        return self.email

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL_STATUSES


class Worker(models.Model):
    """One worker invocation (a Lambda invocation or a local process) serving one customer."""

    class Runtime(models.TextChoices):
        LOCAL = "local", "Local"
        LAMBDA = "lambda", "AWS Lambda"

    class State(models.TextChoices):
        STARTING = "starting", "Starting"
        RUNNING = "running", "Running"
        STOPPED = "stopped", "Stopped"
        LOST = "lost", "Lost (missed its check-ins)"

    LIVE_STATES = (State.STARTING, State.RUNNING)

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="workers")
    runtime = models.CharField(max_length=10, choices=Runtime.choices, default=Runtime.LOCAL)
    request_id = models.CharField(
        max_length=100, blank=True, help_text="The runtime's id for the invocation."
    )
    state = models.CharField(max_length=10, choices=State.choices, default=State.STARTING)
    last_seq = models.PositiveIntegerField(
        default=0, help_text="Sequence number of the last check-in answered."
    )
    last_response = models.JSONField(
        null=True, blank=True, help_text="Answer to last_seq, replayed if the worker retries it."
    )
    rate_per_s = models.FloatField(null=True, blank=True, help_text="Measured sends per second.")
    throttled_minute = models.DateTimeField(
        null=True, blank=True, help_text="The last minute in which the provider throttled it."
    )
    stop_reason = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField(auto_now_add=True)
    last_checkin_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["customer", "state"], name="worker_customer_state")]

    def __str__(self):
        return f"worker {self.pk} ({self.get_state_display()})"

    @property
    def is_live(self) -> bool:
        return self.state in self.LIVE_STATES


class Lease(models.Model):
    """A batch of recipients granted to a worker for one calendar minute.

    `recipient_ids` is in the order the worker starts them; the worker reports `started_through`
    (how many of them it may have started) before each chunk, so a worker that dies leaves at
    most one chunk in doubt: on expiry, recipients past the mark go back to the queue and those
    up to it without a result become `unknown`.
    """

    class State(models.TextChoices):
        OPEN = "open", "Open"
        SETTLED = "settled", "Settled by the worker's report"
        EXPIRED = "expired", "Expired and reclaimed"

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="leases")
    worker = models.ForeignKey(Worker, on_delete=models.CASCADE, related_name="leases")
    state = models.CharField(max_length=10, choices=State.choices, default=State.OPEN)
    minute_start = models.DateTimeField(help_text="The calendar minute this batch is charged to.")
    size = models.PositiveIntegerField()
    recipient_ids = models.JSONField(default=list)
    granted_at = models.DateTimeField()
    start_at = models.DateTimeField(help_text="Sends may start from here …")
    stop_starting_at = models.DateTimeField(help_text="… until here.")
    minute_ends_in_ms = models.PositiveIntegerField(
        help_text="The minute's end, relative to the grant, as told to the worker."
    )
    guard_ms = models.PositiveIntegerField(help_text="The guard band in force for this grant.")
    may_cross = models.BooleanField(
        default=True, help_text="Whether its sends may arrive after its minute ends."
    )
    started_through = models.PositiveIntegerField(
        default=0, help_text="How many recipients, in order, the worker may have started."
    )
    overdue_at = models.DateTimeField(
        help_text="A worker not back by then is presumed lost and may be replaced."
    )
    expires_at = models.DateTimeField(
        help_text="No send of this batch can still arrive after this; then it is reclaimed."
    )
    settled_at = models.DateTimeField(null=True, blank=True)
    # Null while open (and for leases settled before it existed: then any recipient up to the
    # mark); once settled, the recipients a late report may still tell about, each once.
    awaiting = models.JSONField(
        null=True,
        blank=True,
        help_text="Recipients up to the progress mark that the lease was settled without an "
        "outcome for (left out of its report, or all of them when it was reclaimed).",
    )

    class Meta:
        indexes = [
            models.Index(
                fields=["customer", "minute_start"],
                condition=models.Q(state="open"),
                name="lease_open_by_minute",
            ),
            models.Index(
                fields=["expires_at"], condition=models.Q(state="open"), name="lease_open_expiry"
            ),
        ]

    def __str__(self):
        return f"lease {self.pk} ({self.size} recipients)"


class CustomerMinute(models.Model):
    """One row per customer per calendar minute: the pacing ledger and the charts' source.

    Budget used in a minute = granted - refunded + carried_in (+ recipients still in open leases of
    the previous minute, which may yet arrive in this one).
    """

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="minutes")
    minute_start = models.DateTimeField()
    cap = models.PositiveIntegerField(help_text="The per-minute cap in force when last granted.")
    granted = models.PositiveIntegerField(default=0)
    refunded = models.PositiveIntegerField(default=0)
    carried_in = models.PositiveIntegerField(
        default=0, help_text="Sends of the previous minute that may have arrived in this one."
    )
    sent = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    throttled = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-minute_start"]
        constraints = [
            models.UniqueConstraint(
                fields=["customer", "minute_start"], name="customer_minute_unique"
            ),
        ]

    def __str__(self):
        return f"{self.customer} @ {self.minute_start:%Y-%m-%d %H:%M:%S}"

    @property
    def charged(self) -> int:
        return self.granted - self.refunded + self.carried_in


class ConductorLease(models.Model):
    """Which conductor chain runs a customer's sends: at most one at a time.

    Taken and renewed with one conditional UPDATE (works on both databases): a chain holds it
    while it keeps renewing; once `expires_at` passes, the watchdog starts a new chain that takes
    it over.
    """

    customer = models.OneToOneField(
        Customer, on_delete=models.CASCADE, primary_key=True, related_name="conductor_lease"
    )
    holder = models.CharField(max_length=64, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"conductor of {self.customer_id}: {self.holder or 'none'}"


class CustomerPacing(models.Model):
    """What pacing learned from a customer's provider refusals (sending/throttle.py): a wider
    start guard (decaying), a back-off, this minute's lower cap, and why, for the operator."""

    customer = models.OneToOneField(
        Customer, on_delete=models.CASCADE, primary_key=True, related_name="pacing"
    )
    learned_guard_ms = models.PositiveIntegerField(
        default=0, help_text="Start guard widening learned at the minute's edge (halves hourly)."
    )
    guard_learned_at = models.DateTimeField(null=True, blank=True)
    hold_until = models.DateTimeField(
        null=True, blank=True, help_text="Back-off after a refusal: no grant starts before it."
    )
    estimate_minute = models.DateTimeField(null=True, blank=True)
    cap_estimate = models.PositiveIntegerField(
        null=True, blank=True, help_text="The cap for the rest of estimate_minute."
    )
    last_refusal_at = models.DateTimeField(null=True, blank=True)
    last_refusal = models.CharField(max_length=500, blank=True, help_text="What pacing concluded.")

    class Meta:
        verbose_name_plural = "customer pacing"

    def __str__(self):
        return f"pacing of {self.customer}"


class TrackingEvent(models.Model):
    """One provider tracking event (django-anymail's normalized form), stored once.

    The unique (esp, event_id, email) key makes a provider's retries and duplicate deliveries
    no-ops. Recipient and message are plain ids, not foreign keys: the retention purge deletes
    recipients, and an event's record outlives them (the message page's counts).
    """

    class Kind(models.TextChoices):
        HARD_BOUNCE = "hard_bounce", "Hard bounce"
        COMPLAINT = "complaint", "Complaint"
        OTHER = "other", "Other"

    esp = models.CharField(max_length=30)
    event_id = models.CharField(max_length=255)
    email = models.EmailField(max_length=254, blank=True)
    event_type = models.CharField(max_length=20, help_text="anymail's event type.")
    kind = models.CharField(max_length=12, choices=Kind.choices)
    description = models.CharField(max_length=255, blank=True)
    customer = models.ForeignKey(
        Customer, on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    message_id = models.BigIntegerField(null=True, blank=True)
    recipient_id = models.BigIntegerField(null=True, blank=True)
    occurred_at = models.DateTimeField(null=True, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-received_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["esp", "event_id", "email"], name="tracking_event_unique"
            ),
        ]
        indexes = [
            models.Index(fields=["message_id", "kind"], name="tracking_event_message"),
            models.Index(
                fields=["recipient_id"],
                condition=~models.Q(kind="other"),
                name="tracking_event_recipient",
            ),
        ]

    def __str__(self):
        return f"{self.esp} {self.event_type} {self.email}"


class TestSend(models.Model):
    """A test send: a message rendered with one recipient's merge data, sent to a few staff
    addresses through the customer's provider, charged to the customer's minute like any send."""

    __test__ = False  # not a test case, whatever pytest makes of its name

    class Outcome(models.TextChoices):
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed at the provider"
        REFUSED = "refused", "Refused (no budget left in the minute)"

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="test_sends")
    addresses = models.JSONField(default=list, help_text="The staff addresses it went to.")
    merge_from = models.ForeignKey(
        Recipient,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The recipient whose merge data it was rendered with.",
    )
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    detail = models.TextField(blank=True, help_text="Provider ids, or why it failed.")
    minute_start = models.DateTimeField(
        null=True, blank=True, help_text="The calendar minute it was charged to."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"test send of {self.message_id} to {', '.join(self.addresses)}"
