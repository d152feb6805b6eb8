"""Read queries for the admin: progress counts, previews, the delivery log."""

from collections.abc import Iterator
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce

from customers.unsubscribe import unsubscribe_url

from .models import Message, Recipient

DELIVERY_LOG_COLUMNS = (
    "email",
    "status",
    "attempts",
    "provider_message_id",
    "sent_at",
    "last_error",
)


def _recipient_count(status: str) -> Coalesce:
    recipients = Recipient.objects.filter(message=OuterRef("pk"), status=status)
    # COUNT(*), not COUNT(id): the (message, status) index alone answers it.
    counted = recipients.order_by().values("message").annotate(n=Count("*")).values("n")
    return Coalesce(Subquery(counted), 0)


def count_field(status: str) -> str:
    return f"n_{status}"


def messages_with_progress(queryset: QuerySet[Message]) -> QuerySet[Message]:
    """Annotate n_<status> for every recipient status, in the same query as the messages.

    Counted by correlated subqueries rather than a JOIN … GROUP BY: the database sorts and cuts
    the page first, then counts only that page's recipients, each count an index-only range on
    (message, status). A JOIN would group every recipient of every message before the LIMIT.
    """
    return queryset.annotate(
        **{count_field(status): _recipient_count(status) for status in Recipient.Status.values}
    )


@dataclass(frozen=True)
class Progress:
    total: int
    by_status: dict[str, int]

    @property
    def terminal(self) -> int:
        return sum(self.by_status.get(status, 0) for status in Recipient.TERMINAL_STATUSES)

    @property
    def percent(self) -> float:
        return 100.0 * self.terminal / self.total if self.total else 0.0


def progress_of(message: Message) -> Progress:
    """Progress from the annotations of messages_with_progress()."""
    by_status = {
        status: getattr(message, count_field(status)) for status in Recipient.Status.values
    }
    return Progress(total=sum(by_status.values()), by_status=by_status)


@dataclass(frozen=True)
class Preview:
    recipient: Recipient | None
    subject: str = ""
    text: str = ""
    html: str = ""
    errors: tuple[str, ...] = ()


def first_recipient(*, message: Message) -> Recipient | None:
    # The first queued recipient comes straight off the claim index; once none is queued, any
    # recipient will do for a preview.
    recipient = message.recipients.filter(status=Recipient.Status.QUEUED).order_by("id").first()
    if recipient is None:
        recipient = next(iter(message.recipients.order_by()[:1]), None)
    return recipient


def message_preview(*, message: Message) -> Preview:
    """The message as its first recipient will get it."""
    recipient = first_recipient(message=message)
    merge = dict(recipient.merge_data) if recipient else {}
    if recipient is not None:
        # The link this recipient's copy will carry (the worker gets the same from the server).
        merge["unsubscribe_url"] = unsubscribe_url(
            customer_id=message.customer_id, email=recipient.email
        )
    try:
        subject, text, html = message.compiled().render(merge)
    except ValidationError as exc:
        return Preview(recipient=recipient, errors=tuple(exc.messages))
    return Preview(
        recipient=recipient, subject=_plain(subject), text=_plain(text), html=_plain(html)
    )


def _plain(rendered: str) -> str:
    # The template engine marks its output safe: safe to *send*, but shown inside an admin page
    # it is untrusted text that must be escaped like any other. A plain str gets escaped.
    return "".join(rendered)


def recent_messages(*, limit: int) -> QuerySet[Message]:
    return Message.objects.select_related("customer").order_by("-created_at", "-id")[:limit]


def delivery_log_rows(queryset: QuerySet[Recipient], *, chunk_size: int = 2000) -> Iterator[tuple]:
    """Rows of the delivery log in id order, streamed from the database in chunks."""
    return (
        queryset.order_by("id").values_list(*DELIVERY_LOG_COLUMNS).iterator(chunk_size=chunk_size)
    )
