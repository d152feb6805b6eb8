"""The worker API's wire format (sending/openapi.yaml): requests parsed, answers built, errors.

Parsing never touches the database; anything malformed raises BadRequest naming every field that
is wrong (400). Answers are built from rows the caller read; credentials travel only in them.
"""

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson
from django.conf import settings

from customers import unsubscribe

if TYPE_CHECKING:
    from customers.models import Customer

    from . import pacing
    from .models import Message, Recipient
    from .queue import Claimed

API_VERSION = "v1"

MAX_RESULTS = 1000  # a batch is at most 1,000 recipients (SendLimit.batch_size)
MAX_LATE = 20  # late reports one check-in may carry
MAX_ERROR_CHARS = 2000
MAX_INT = 2**63 - 1  # ids and counts are 64-bit in the database


class BadRequest(Exception):
    """The request is malformed (400): `problems` names every field that is wrong."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class Forbidden(Exception):
    """The token does not allow this (403)."""


class Conflict(Exception):
    """The request does not fit the worker's state (409): nothing was recorded."""


class Outcome(StrEnum):
    SENT = "sent"
    FAILED = "failed"  # the provider refused it; `permanent` says whether a retry could help
    THROTTLED = "throttled"  # the provider said "too many"; not sent, goes back to the queue
    NOT_STARTED = "not_started"  # never handed to the provider; goes back to the queue
    UNKNOWN = "unknown"  # may have reached the provider (e.g. a timeout): never re-sent


@dataclass(frozen=True)
class Result:
    id: int
    outcome: Outcome
    provider_id: str = ""
    permanent: bool = False
    error: str = ""
    done_ms: int | None = None  # when the provider's answer came, ms after the grant arrived
    retry_after_ms: int | None = None  # throttled: the provider's Retry-After, when it gave one


@dataclass(frozen=True)
class Report:
    lease_id: int
    elapsed_ms: int
    results: tuple[Result, ...]


@dataclass(frozen=True)
class CheckinRequest:
    worker_id: int
    seq: int
    request_id: str
    report: Report | None
    final: bool = False  # the worker is exiting: record the report, offer nothing more
    # How long the worker measures its provider takes to answer a send (ms); 0 when it does not
    # say. A grant's start window ends that much earlier (pacing.decide).
    answer_ms: int = 0
    # The rest of leases already settled (a send that was still out, answered since): recorded
    # over the `unknown` their recipients were left in (leases.record_late).
    late: tuple[Report, ...] = ()


@dataclass(frozen=True)
class ProgressRequest:
    worker_id: int
    lease_id: int
    started_through: int


def _int(obj: dict, key: str, problems: list[str], *, where: str, minimum: int = 0) -> int:
    value = obj.get(key)
    if isinstance(value, float) and abs(value) > MAX_INT:
        # The JSON parser reads integers past 64 bits as floats.
        problems.append(f"{where}{key}: must be a 64-bit integer")
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{where}{key}: required, an integer")
        return 0
    if value < minimum:
        problems.append(f"{where}{key}: must be ≥ {minimum}")
    elif value > MAX_INT:
        problems.append(f"{where}{key}: must be ≤ {MAX_INT} (a 64-bit integer)")
    return value


def _object(body: Any, problems: list[str]) -> dict:
    if not isinstance(body, dict):
        problems.append("body: must be a JSON object")
        return {}
    return body


# What the provider may have received: charged to its minute, never re-sent automatically.
STARTED = frozenset({Outcome.SENT, Outcome.FAILED, Outcome.UNKNOWN})

_OUTCOMES = {o.value: o for o in Outcome}
_NEED_DONE_MS = (Outcome.SENT, Outcome.FAILED)


def _result(raw: Any, index: int, problems: list[str], prefix: str = "report") -> Result | None:
    if type(raw) is dict:
        # The common case, checked in one expression (a report has up to 1,000 results); anything
        # else falls through to the checks below, which name every problem.
        recipient_id = raw.get("id")
        status = raw.get("status")
        outcome = _OUTCOMES.get(status) if type(status) is str else None
        provider_id = raw.get("provider_id", "")
        error = raw.get("error", "")
        permanent = raw.get("permanent", False)
        done_ms = raw.get("done_ms")
        retry_after_ms = raw.get("retry_after_ms")
        if (
            type(recipient_id) is int
            and 1 <= recipient_id <= MAX_INT
            and outcome is not None
            and type(provider_id) is str
            and len(provider_id) <= 255
            and type(error) is str
            and type(permanent) is bool
            and (done_ms is None or (type(done_ms) is int and 0 <= done_ms <= MAX_INT))
            and (provider_id or outcome is not Outcome.SENT)
            and (done_ms is not None or outcome not in _NEED_DONE_MS)
            and (retry_after_ms is None or (type(retry_after_ms) is int and retry_after_ms >= 0))
        ):
            return Result(
                recipient_id,
                outcome,
                provider_id,
                permanent,
                error[:MAX_ERROR_CHARS],
                done_ms,
                None if retry_after_ms is None else min(retry_after_ms, MAX_INT),
            )
    return _result_checked(raw, index, problems, prefix)


def _result_checked(
    raw: Any, index: int, problems: list[str], prefix: str = "report"
) -> Result | None:
    where = f"{prefix}.results[{index}]."
    if not isinstance(raw, dict):
        problems.append(f"{prefix}.results[{index}]: must be an object")
        return None
    before = len(problems)
    recipient_id = _int(raw, "id", problems, where=where, minimum=1)
    try:
        outcome = Outcome(raw.get("status"))
    except ValueError:
        choices = ", ".join(o.value for o in Outcome)
        problems.append(f"{where}status: one of {choices}")
        outcome = Outcome.NOT_STARTED
    provider_id = raw.get("provider_id", "")
    error = raw.get("error", "")
    permanent = raw.get("permanent", False)
    done_ms = raw.get("done_ms")
    if not isinstance(provider_id, str) or len(provider_id) > 255:
        problems.append(f"{where}provider_id: a string of at most 255 characters")
    if not isinstance(error, str):
        problems.append(f"{where}error: a string")
    if not isinstance(permanent, bool):
        problems.append(f"{where}permanent: true or false")
    if done_ms is not None and (
        isinstance(done_ms, bool) or not isinstance(done_ms, int) or not 0 <= done_ms <= MAX_INT
    ):
        problems.append(f"{where}done_ms: a non-negative 64-bit integer")
    retry_after_ms = raw.get("retry_after_ms")
    if retry_after_ms is not None and (
        isinstance(retry_after_ms, bool)
        or not isinstance(retry_after_ms, int)
        or not 0 <= retry_after_ms <= MAX_INT
    ):
        problems.append(f"{where}retry_after_ms: a non-negative 64-bit integer")
    if outcome is Outcome.SENT and not provider_id:
        problems.append(f"{where}provider_id: required when status is sent")
    if outcome in (Outcome.SENT, Outcome.FAILED) and done_ms is None:
        problems.append(f"{where}done_ms: required when status is {outcome.value}")
    if len(problems) > before:
        return None
    return Result(
        id=recipient_id,
        outcome=outcome,
        provider_id=provider_id,
        permanent=permanent,
        error=error[:MAX_ERROR_CHARS],
        done_ms=done_ms,
        retry_after_ms=retry_after_ms,
    )


def _report(raw: Any, problems: list[str], prefix: str = "report") -> Report | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{prefix}: must be an object or null")
        return None
    lease_id = _int(raw, "lease_id", problems, where=f"{prefix}.", minimum=1)
    elapsed_ms = _int(raw, "elapsed_ms", problems, where=f"{prefix}.")
    raw_results = raw.get("results")
    if not isinstance(raw_results, list):
        problems.append(f"{prefix}.results: required, a list")
        return None
    if len(raw_results) > MAX_RESULTS:
        problems.append(f"{prefix}.results: at most {MAX_RESULTS} entries")
        return None
    results = tuple(_result(r, i, problems, prefix) for i, r in enumerate(raw_results))
    return Report(lease_id=lease_id, elapsed_ms=elapsed_ms, results=results)  # type: ignore[arg-type]


def parse_checkin(body: Any) -> CheckinRequest:
    problems: list[str] = []
    obj = _object(body, problems)
    worker_id = _int(obj, "worker_id", problems, where="", minimum=1) if obj else 0
    seq = _int(obj, "seq", problems, where="", minimum=1) if obj else 0
    request_id = obj.get("request_id", "")
    if not isinstance(request_id, str) or len(request_id) > 100:
        problems.append("request_id: a string of at most 100 characters")
    report = _report(obj.get("report"), problems)
    final = obj.get("final", False)
    if not isinstance(final, bool):
        problems.append("final: true or false")
    late = _late(obj.get("late", []), problems)
    answer_ms = _int(obj, "answer_ms", problems, where="") if "answer_ms" in obj else 0
    unknown = set(obj) - {"worker_id", "seq", "request_id", "report", "final", "late", "answer_ms"}
    if unknown:
        problems.append(f"unknown fields: {', '.join(sorted(unknown))}")
    if problems:
        raise BadRequest(problems)
    return CheckinRequest(
        worker_id=worker_id,
        seq=seq,
        request_id=request_id,
        report=report,
        final=final,
        late=late,
        answer_ms=answer_ms,
    )


def _late(raw: Any, problems: list[str]) -> tuple[Report, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_LATE:
        problems.append(f"late: a list of at most {MAX_LATE} reports")
        return ()
    late = []
    for index, item in enumerate(raw):
        if item is None:
            problems.append(f"late[{index}]: must be an object")
            continue
        report = _report(item, problems, f"late[{index}]")
        if report is not None:
            late.append(report)
    return tuple(late)


def parse_progress(body: Any) -> ProgressRequest:
    problems: list[str] = []
    obj = _object(body, problems)
    if obj:
        worker_id = _int(obj, "worker_id", problems, where="", minimum=1)
        lease_id = _int(obj, "lease_id", problems, where="", minimum=1)
        started_through = _int(obj, "started_through", problems, where="")
        unknown = set(obj) - {"worker_id", "lease_id", "started_through"}
        if unknown:
            problems.append(f"unknown fields: {', '.join(sorted(unknown))}")
    if problems:
        raise BadRequest(problems)
    return ProgressRequest(worker_id=worker_id, lease_id=lease_id, started_through=started_through)


# --- answers -----------------------------------------------------------------------------------


def stop(reason: str) -> dict:
    return {"decision": "stop", "reason": reason}


def wait(ms: int) -> dict:
    return {"decision": "wait", "wait_ms": ms}


def batch(
    *,
    lease_id: int,
    grant: "pacing.Grant",
    limits: "pacing.Limits",
    chunk_limit: int,
    customer: "Customer",
    messages: "list[Message]",
    recipients: "list[Claimed]",
    held_ms: int | None = None,
) -> dict:
    """A "send" answer: everything the worker needs, so it never reads the database.
    `held_ms`: how long the server held the request before deciding, when it knows (the
    worker anchors the window's end that much after its request; kept in the stored answer,
    so a replay carries the hold of the request the decision was made for).

    Its recipients' rows are left out (None): `with_recipients` adds them once the check-in's
    transaction has committed, so that building them (an unsubscribe link, an HMAC, for each)
    is not part of the time the customer's lock is held, which its other workers queue behind.
    """
    used = {r.message_id for r in recipients}
    return {
        "decision": "send",
        "batch": {
            "lease_id": lease_id,
            "start_in_ms": grant.start_in_ms,
            "stop_starting_in_ms": grant.stop_starting_in_ms,
            **({} if held_ms is None else {"held_ms": held_ms}),
            "minute_ends_in_ms": grant.minute_ends_in_ms,
            # A send answered after this is charged to the next minute as well (docs/pacing.md).
            "answer_by_in_ms": grant.minute_ends_in_ms - limits.guard_ms,
            "concurrency": limits.concurrency,
            # The most recipients one progress report may declare.
            "chunk_limit": chunk_limit,
            # The per-send timeout the pacing assumes (no send arrives later than this).
            "send_timeout_ms": limits.spill_hold_ms,
            "provider": provider_payload(customer),
            "messages": {str(m.pk): message_payload(m) for m in messages if m.pk in used},
            "recipients": None,
        },
    }


def with_recipients(answer: dict, customer: "Customer", recipients: "list[Claimed]") -> dict:
    """A `batch` answer with its recipients' rows, in lease order."""
    # The merge data is passed on as the JSON text the claim read, unparsed.
    rows = _rows(customer, recipients, merge=lambda r: orjson.Fragment(r.merge_json))
    return {**answer, "batch": {**answer["batch"], "recipients": rows}}


def _rows(customer: "Customer", recipients, *, merge) -> list[dict]:
    """A batch's recipients as the worker reads them, each with its unsubscribe link."""
    link = unsubscribe.url_maker()
    return [
        {
            "id": r.id,
            "message": r.message_id,
            "to": r.email,
            "merge": merge(r),
            "unsubscribe_url": link(customer.pk, r.email),
        }
        for r in recipients
    ]


def provider_payload(customer: "Customer") -> dict | None:
    """How the worker reaches the customer's provider: credentials travel only in the live answer
    over the API (never stored: `replayable`), or not at all when held by reference."""
    account = customer.provider_account
    if account is None:
        return None
    payload = {
        "kind": account.kind,
        "settings": account.settings,
        "credentials": account.credentials,
        "per_minute_cap": account.per_minute_cap,
    }
    if account.credentials_ref:
        # Held by reference: the worker reads it with its own role; nothing secret travels.
        payload["credentials_ref"] = account.credentials_ref
    return payload


def message_payload(message: "Message") -> dict:
    customer = message.customer
    return {
        "subject": message.subject,
        "text": message.text_body,
        "html": message.html_body,
        "from_email": message.from_email or customer.default_from_email,
        "reply_to": message.reply_to or customer.default_reply_to,
        "unsubscribe_mailto": settings.UNSUBSCRIBE_MAILTO,
    }


def replayable(answer: dict) -> dict:
    """The answer as stored for a retried seq: recipients are kept as ids only (the lease has
    them, and their data does not change while leased), so each check-in writes a few hundred
    bytes rather than the whole batch; and without its provider block, so no credential is ever
    stored in a worker's row (a replay reads the account again)."""
    sent = answer.get("batch")
    if sent is None:
        return answer
    return {**answer, "batch": {**sent, "recipients": None, "provider": None}}


def replay(stored: dict, recipients: "list[Recipient]", customer: "Customer") -> dict:
    """A stored answer made whole again: its lease's recipients (with their unsubscribe links),
    in lease order, and the customer's provider block as it is now."""
    if stored.get("batch") is None:
        return stored
    rows = _rows(customer, recipients, merge=lambda r: r.merge_data)
    batch = {**stored["batch"], "recipients": rows, "provider": provider_payload(customer)}
    return {**stored, "batch": batch}
