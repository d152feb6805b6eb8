"""Who sends and how fast: Customer, SendLimit (history kept), ProviderAccount (credentials
encrypted or held by reference, re-entered whenever where it sends changes; history kept),
Suppression and Resubscription (the audit of addresses taken off the list)."""

import re
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone
from simple_history.models import HistoricalRecords
from timezone_field import TimeZoneField

from .fields import EncryptedJSONField

PER_MINUTE_MAX = 1_000_000

# The settings that say where an account's mail (and so its credentials) goes: changing any of
# them, or the kind, needs the credentials entered again. The TLS flags are here too: turning TLS
# off would send an SMTP password in clear.
DESTINATION_SETTINGS = ("host", "port", "use_tls", "use_ssl", "api_url", "endpoint_url", "region")

# Settings are shown on pages and kept in the history: a name like these belongs in credentials.
SECRET_LOOKING_NAMES = ("password", "secret", "token", "api_key", "access_key")

# A Secrets Manager secret or an SSM parameter, by ARN.
CREDENTIALS_REF_RE = re.compile(
    r"^arn:aws[a-z-]*:(secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]+"
    r"|ssm:[a-z0-9-]+:\d{12}:parameter/[A-Za-z0-9/_.-]+)$"
)


def validate_credentials_ref(value: str) -> None:
    if not CREDENTIALS_REF_RE.match(value):
        raise ValidationError(
            "Not a Secrets Manager secret or SSM parameter ARN "
            "(arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME or "
            "arn:aws:ssm:REGION:ACCOUNT:parameter/NAME)."
        )


class ProviderAccount(models.Model):
    """The mail provider account a customer sends through; several customers may share one."""

    class Kind(models.TextChoices):
        SANDBOX = "sandbox", "Sandbox (local, records every send)"
        SMTP = "smtp", "SMTP"
        AMAZON_SES = "amazon_ses", "Amazon SES v2"
        POSTMARK = "postmark", "Postmark"

    name = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.SANDBOX)
    settings = models.JSONField(
        default=dict,
        blank=True,
        help_text="Non-secret settings: host and port for SMTP, region for SES, an ESP's API URL.",
    )
    credentials = EncryptedJSONField(
        blank=True,
        help_text="Secrets (passwords, API keys), encrypted at rest and never shown back.",
    )
    credentials_ref = models.CharField(
        "credentials by reference",
        max_length=2048,
        blank=True,
        help_text="Instead of stored credentials: the ARN of a Secrets Manager secret or an SSM "
        "parameter holding them as a JSON object. Lambda workers read it themselves; the "
        "credentials never travel.",
    )
    credentials_changed_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When credentials were last entered."
    )
    per_minute_cap = models.PositiveIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(PER_MINUTE_MAX)],
        help_text="The provider's own limit per calendar minute for this account.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Every change is kept (who, when, why), but never the credentials, not even encrypted.
    history = HistoricalRecords(excluded_fields=["credentials"])

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(per_minute_cap__gte=1, per_minute_cap__lte=PER_MINUTE_MAX),
                name="provider_cap_in_range",
            ),
        ]

    def __str__(self):
        return f"{self.name} ({self.get_kind_display()})"

    def save(self, *args, **kwargs):
        # An invariant of the row, not only of a form: the stored credentials never follow the
        # account to a new destination (see ProviderAccount.enter_credentials).
        self.check_credentials_reentry()
        super().save(*args, **kwargs)

    @property
    def has_credentials(self) -> bool:
        return bool(self.credentials or self.credentials_ref)

    def enter_credentials(self, *, credentials: dict | None = None, ref: str = "") -> None:
        """Replace the credentials (a dict, a reference, or neither to remove them)."""
        self.credentials = credentials or {}
        self.credentials_ref = ref
        self.credentials_changed_at = timezone.now()
        self._credentials_entered = True

    @property
    def credentials_were_entered(self) -> bool:
        return getattr(self, "_credentials_entered", False)

    def destination_changes(self) -> list[str]:
        """What this edit changes of where the account sends, against the stored row."""
        stored = self._stored()
        return [] if stored is None else self._changes_from(stored)

    def check_credentials_reentry(self) -> None:
        """Refuse a change of kind, host, endpoint or API URL that keeps the stored credentials:
        whoever may edit an account must not be able to point it at their own server and have
        the workers hand it the saved password."""
        if self.credentials_were_entered:
            return
        stored = self._stored()
        if stored is None or not stored.has_credentials:
            return
        changes = self._changes_from(stored)
        if changes:
            raise ValidationError(
                f"Changing {', '.join(changes)} needs the credentials entered again: the "
                "stored ones are not sent to a new destination."
            )

    def _stored(self) -> "ProviderAccount | None":
        return None if self.pk is None else ProviderAccount.objects.filter(pk=self.pk).first()

    def _changes_from(self, stored: "ProviderAccount") -> list[str]:
        changes = ["kind"] if stored.kind != self.kind else []
        before, after = stored.settings or {}, self.settings or {}
        return changes + [key for key in DESTINATION_SETTINGS if before.get(key) != after.get(key)]

    def clean(self):
        secret_looking = [
            name
            for name in (self.settings or {})
            if any(word in str(name).lower() for word in SECRET_LOOKING_NAMES)
        ]
        if secret_looking:
            raise ValidationError(
                {
                    "settings": f"{', '.join(secret_looking)}: enter secrets as credentials "
                    "(encrypted, never shown), not as settings (shown, and kept in the history)."
                }
            )
        if self.credentials and self.credentials_ref:
            raise ValidationError(
                {"credentials_ref": "Either store credentials or give a reference, not both."}
            )
        if self.credentials_ref:
            try:
                validate_credentials_ref(self.credentials_ref)
            except ValidationError as exc:
                raise ValidationError({"credentials_ref": exc.messages}) from None
        self.check_credentials_reentry()
        if self.pk is None:
            return
        too_high = SendLimit.objects.filter(
            customer__provider_account=self, per_minute__gt=self.per_minute_cap
        ).select_related("customer")
        if too_high:
            names = ", ".join(f"{limit.customer} ({limit.per_minute}/min)" for limit in too_high)
            raise ValidationError(
                {"per_minute_cap": f"These customers send faster than this cap: {names}."}
            )


class Customer(models.Model):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=80, unique=True)
    time_zone = TimeZoneField(default="UTC", help_text="Schedules are shown in this time zone.")
    default_from_email = models.EmailField()
    default_reply_to = models.EmailField(blank=True)
    dkim_selector = models.CharField(
        "DKIM selector",
        max_length=63,
        blank=True,
        validators=[
            RegexValidator(
                r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$",
                "A selector is one or more DNS labels: letters, digits and hyphens, "
                "separated by dots.",
            )
        ],
        help_text="The selector the provider signs this customer's mail with (for "
        "s1._domainkey.example.edu, enter s1). The sending-domain check looks up its key.",
    )
    provider_account = models.ForeignKey(
        ProviderAccount,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="customers",
        help_text="Required before this customer can send.",
    )
    is_active = models.BooleanField(default=True)
    alert_email = models.EmailField(
        blank=True,
        help_text="Where alerts about this customer's sends go (a silent conductor, throttling, "
        "a minute over the cap), besides the site's admins.",
    )
    notes = models.TextField(blank=True)
    # Automatic halt (sending.tracking): a sending message pauses itself when the hard bounces or
    # complaints among its last `halt_window` sends reach these rates.
    halt_window = models.PositiveIntegerField(
        default=1000,
        validators=[MinValueValidator(100), MaxValueValidator(100_000)],
        help_text="Automatic halt: the rates are measured over this many of a message's last "
        "sends (or all of them, once it has sent at least 100).",
    )
    halt_bounce_percent = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        default=Decimal("5.00"),
        validators=[MinValueValidator(Decimal("0.01")), MaxValueValidator(Decimal("100"))],
        help_text="Pause a message when this share of those sends hard-bounced (%).",
    )
    halt_complaint_percent = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        default=Decimal("0.30"),
        validators=[MinValueValidator(Decimal("0.01")), MaxValueValidator(Decimal("100"))],
        help_text="Pause a message when this share of those sends was reported as spam (%). "
        "Gmail and Yahoo start rejecting bulk mail above 0.3 %.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class SendLimit(models.Model):
    """How fast one customer may send. Edited while a send runs; every change is recorded."""

    customer = models.OneToOneField(Customer, on_delete=models.CASCADE, related_name="send_limit")
    per_minute = models.PositiveIntegerField(
        default=600,
        validators=[MinValueValidator(1), MaxValueValidator(PER_MINUTE_MAX)],
        help_text="Sends per calendar minute; never more than the provider account's cap.",
    )
    max_workers = models.PositiveSmallIntegerField(
        default=5, validators=[MinValueValidator(1), MaxValueValidator(100)]
    )
    batch_size = models.PositiveSmallIntegerField(
        default=500, validators=[MinValueValidator(1), MaxValueValidator(1000)]
    )
    concurrency = models.PositiveSmallIntegerField(
        default=16,
        validators=[MinValueValidator(1), MaxValueValidator(64)],
        help_text="Provider calls one worker keeps in flight.",
    )
    guard_ms = models.PositiveSmallIntegerField(
        default=250,
        validators=[MinValueValidator(0), MaxValueValidator(5000)],
        help_text="Margin kept free at both ends of each minute for clock skew and latency.",
    )
    paused = models.BooleanField(
        default=False, help_text="Customer-wide brake: no new batches for any message."
    )
    history = HistoricalRecords()

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(per_minute__gte=1, per_minute__lte=PER_MINUTE_MAX),
                name="send_limit_per_minute_in_range",
            ),
            models.CheckConstraint(
                condition=models.Q(max_workers__gte=1, max_workers__lte=100),
                name="send_limit_max_workers_in_range",
            ),
            models.CheckConstraint(
                condition=models.Q(batch_size__gte=1, batch_size__lte=1000),
                name="send_limit_batch_size_in_range",
            ),
            models.CheckConstraint(
                condition=models.Q(concurrency__gte=1, concurrency__lte=64),
                name="send_limit_concurrency_in_range",
            ),
            models.CheckConstraint(
                condition=models.Q(guard_ms__lte=5000), name="send_limit_guard_in_range"
            ),
        ]

    def __str__(self):
        return f"{self.per_minute}/min, {self.max_workers} workers"

    def clean(self):
        account = self.customer.provider_account if self.customer_id else None
        if account and self.per_minute and self.per_minute > account.per_minute_cap:
            raise ValidationError(
                {
                    "per_minute": f"The provider account {account.name} allows at most "
                    f"{account.per_minute_cap} per minute."
                }
            )


class Suppression(models.Model):
    """An address a customer must not mail; the claim path marks such recipients suppressed."""

    class Reason(models.TextChoices):
        UNSUBSCRIBED = "unsubscribed", "Unsubscribed"
        HARD_BOUNCE = "hard_bounce", "Hard bounce"
        COMPLAINT = "complaint", "Complaint"
        MANUAL = "manual", "Added by staff"

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="suppressions")
    email = models.EmailField(max_length=254)
    reason = models.CharField(max_length=20, choices=Reason.choices, default=Reason.MANUAL)
    source = models.CharField(
        max_length=200, blank=True, help_text="Where it came from: a webhook, an import, a person."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                "customer", Lower("email"), name="suppression_unique_customer_email"
            ),
        ]

    def __str__(self):
        return f"{self.email} ({self.get_reason_display()})"


class Resubscription(models.Model):
    """An address taken off a customer's suppression list: who, when, why, and what the list said.

    Kept after the suppression row is deleted: the audit trail of resubscribes."""

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="+")
    email = models.EmailField(max_length=254)
    reason = models.TextField(help_text="Why this address may be mailed again.")
    suppressed_reason = models.CharField(max_length=20, choices=Suppression.Reason.choices)
    suppressed_source = models.CharField(max_length=200, blank=True)
    suppressed_at = models.DateTimeField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.email} resubscribed"
