"""The recipient queue: every set-based statement on recipients — claim, record, release, count.

Never a statement per recipient. The hot path's statements are SQL, each checked against the ORM
in tests/sending/test_statements.py. PostgreSQL claims with `FOR UPDATE SKIP LOCKED` on a keyset
(id past the message's claim cursor) and records through `UPDATE … FROM jsonb_to_recordset(…)`.
SQLite, the embedded default, runs the same shape of statements without row locks (its writers
are serialized) and reads the rows to record from `json_each`.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
from django.db import connection
from django.db.models import Case, F, Value, When

from . import pacing, prepared
from .models import Message, Recipient

QUEUED = Recipient.Status.QUEUED.value
LEASED = Recipient.Status.LEASED.value
SENT = Recipient.Status.SENT.value
FAILED = Recipient.Status.FAILED.value
UNKNOWN = Recipient.Status.UNKNOWN.value
SUPPRESSED = Recipient.Status.SUPPRESSED.value
# Not a stored status: a temporary failure, queued again unless attempts are used up.
RETRY = "retry"


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    message_id: int
    email: str
    merge_json: str  # the recipient's merge data as JSON text, passed on to the worker unparsed


@dataclass(frozen=True)
class ClaimResult:
    leased: list[Claimed]
    suppressed: int
    scanned: int  # rows taken off the queue (leased + suppressed)
    last_id: int  # the highest id taken, the message's next claim cursor


@dataclass(slots=True)
class StatusChange:
    """What `record` writes for one recipient of a lease.

    Not frozen: a check-in makes one per recipient, and a frozen dataclass's `__init__` is
    slower. `record` serializes these fields by name, so they are the columns of its JSON
    parameter.
    """

    id: int
    status: str  # SENT, FAILED, RETRY, QUEUED (not started / throttled) or UNKNOWN
    provider_id: str = ""
    error: str = ""
    attempted: bool = False
    sent_at_ms: int | None = None  # when the provider answered, epoch milliseconds


def _is_postgres() -> bool:
    return connection.vendor == "postgresql"


def sending_messages(customer_id: int) -> list[Message]:
    """The customer's messages that are sending, oldest-started first (the order they are
    served in), with what a grant's answer needs of the customer."""
    return list(
        Message.objects.filter(customer_id=customer_id, status=Message.Status.SENDING)
        .select_related("customer__provider_account")
        .order_by("started_at", "id")
    )


def claim(*, customer_id: int, message_id: int, after_id: int, limit: int) -> ClaimResult:
    """Take up to `limit` queued recipients of a message with id > after_id, oldest first.

    Addresses on the customer's suppression list are marked suppressed in the same statement and
    are not leased.
    """
    with prepared.cursor() as cursor:
        cursor.execute(claim_sql(), [message_id, after_id, limit, customer_id])
        rows = cursor.fetchall()
    leased = []
    suppressed = 0
    for recipient_id, status, email, merge_json in sorted(rows):
        if status == SUPPRESSED:
            suppressed += 1
            continue
        leased.append(Claimed(recipient_id, message_id, email, merge_json or "{}"))
    last_id = max((row[0] for row in rows), default=after_id)
    return ClaimResult(leased=leased, suppressed=suppressed, scanned=len(rows), last_id=last_id)


def claim_sql() -> str:
    """The claim's statement; its parameters: message id, cursor, limit, customer id."""
    if _is_postgres():
        # The UPDATE finds the picked rows again by their physical address (a TID scan) rather
        # than by primary key. The address is that of the version the lock was taken on (a row
        # updated meanwhile is followed to its newest version and checked again), and the lock
        # keeps it from moving until the UPDATE.
        lock, key, picked = (
            "FOR UPDATE SKIP LOCKED",
            "ctid",
            "ctid = ANY(ARRAY(SELECT ctid FROM picked))",
        )
        merge_text = "merge_data::text"  # as text: the answer embeds it as it is
    else:  # SQLite: no row locks (its writers are serialized), JSON is text anyway
        lock, key, picked = "", "id", "id IN (SELECT id FROM picked)"
        merge_text = "merge_data"
    # The statuses are constants in the text (a prepared statement's generic plan uses the
    # partial claim index only for a literal `status = 'queued'`: sending/prepared.py).
    return f"""
        WITH picked AS (
            SELECT {key} FROM sending_recipient
            WHERE message_id = %s AND status = '{QUEUED}' AND id > %s
            ORDER BY id LIMIT %s {lock}
        )
        UPDATE sending_recipient SET status = CASE
            WHEN EXISTS (
                SELECT 1 FROM customers_suppression s
                WHERE s.customer_id = %s AND lower(s.email) = lower(sending_recipient.email)
            ) THEN '{SUPPRESSED}' ELSE '{LEASED}' END
        WHERE {picked}
        RETURNING id, status, email, {merge_text}
    """  # noqa: S608 - only constant fragments are interpolated


def claim_from(message: Message, wanted: int, after: int) -> tuple[list[Claimed], int]:
    """Claim from one message past the cursor `after`; rescan once from the start when the
    cursor reaches the end, so recipients returned to the queue are found again. Returns what was
    claimed and where the claim got to (the message's next cursor)."""
    leased: list[Claimed] = []
    started_at = after
    for attempt in range(2):
        while len(leased) < wanted:
            need = wanted - len(leased)
            result = claim(
                customer_id=message.customer_id, message_id=message.pk, after_id=after, limit=need
            )
            leased += result.leased
            after = result.last_id
            if result.scanned < need:
                break  # this pass reached the end of the queue
        if len(leased) >= wanted or attempt == 1 or started_at == 0:
            break
        after = 0
    return leased, after


@dataclass
class Ahead:
    """Recipients a check-in claimed before taking its customer's lock, and the messages they
    came from.

    `claimed` is in claim order (oldest-started message first). Each message's `claim_after` is
    as read; where each claim pass got to is kept in `positions`, and stored on the messages
    after the check-in's commit (`move_cursors`).
    """

    messages: list[Message]
    claimed: list[Claimed] = field(default_factory=list)
    positions: dict[int, int] = field(default_factory=dict)  # message id -> cursor to store

    def claim(self, wanted: int) -> None:
        """Claim up to `wanted` in all, message by message in the order they are served."""
        for message in self.messages:
            need = wanted - len(self.claimed)
            if need <= 0:
                break
            after = self.positions.get(message.pk, message.claim_after)
            taken, self.positions[message.pk] = claim_from(message, need, after)
            self.claimed += taken

    def give_back(self, keep: int) -> list[Claimed]:
        """Keep the first `keep` claimed recipients and return the rest to the queue (one
        statement), moving each message's cursor back to before the first one returned, so they
        are first in line for the next claim."""
        kept, surplus = self.claimed[:keep], self.claimed[keep:]
        if surplus:
            release([c.id for c in surplus], status=QUEUED)
            for c in surplus:
                position = self.positions.get(c.message_id, c.id)
                self.positions[c.message_id] = min(position, c.id - 1)
        self.claimed = kept
        return kept


def move_cursors(ahead: Ahead) -> None:
    """Store where the claims got to in each message; run after the check-in's commit.

    The cursor is where the next claim starts looking, not what makes a claim exclusive (leased
    rows are not queued, and rows being claimed are locked), so a cursor read stale costs a claim
    only a walk over entries it skips. It is written outside the check-in's transaction, which
    then never waits for a message's row lock while holding claimed rows: an operator's cancel
    holds that lock while it cancels the message's queued rows, which would wait for ours.
    Written only if no other check-in moved it since it was read.
    """
    table = connection.ops.quote_name(Message._meta.db_table)
    with prepared.cursor() as cursor:
        for message in ahead.messages:
            position = ahead.positions.get(message.pk)
            if position is None or position == message.claim_after:
                continue
            cursor.execute(
                f"UPDATE {table} SET claim_after = %s WHERE id = %s AND claim_after = %s",  # noqa: S608
                [position, message.pk, message.claim_after],
            )


# A message's queued recipients past a cursor, up to a limit; parameters: message id, cursor,
# limit. Only the ids, so the count is answered from the claim index alone (its status a
# literal, as in `claim_sql`).
BACKLOG_SQL = f"""SELECT COUNT(*) FROM (
        SELECT id FROM {Recipient._meta.db_table}
        WHERE message_id = %s AND status = '{QUEUED}' AND id > %s ORDER BY id LIMIT %s
    ) AS ahead"""  # noqa: S608 - table name and a constant only


def count_backlog(
    *,
    customer_id: int,
    limits: pacing.Limits,
    messages: list[Message] | None = None,
    cursors: dict[int, int] | None = None,
) -> int:
    """Queued recipients of the customer's sending messages, for pacing decisions.

    Counted exactly up to a pool's worth of batches; past that it is reported as at least a
    minute's cap. Pacing needs the backlog exactly only when it is small (the last batches,
    `Stop(done)`); above, it needs to know it is at least what a minute can send. An estimate on
    the high side there keeps a worker a little longer near the end, never one too few.

    The count walks the claim index from each message's claim cursor: the entries behind a cursor
    belong to recipients already taken (dead until vacuum, yet each one is visited by a count
    from the start). Only when what lies ahead of the cursors is within the exact range are the
    recipients returned to the queue behind them counted too. `cursors` (message id -> cursor)
    overrides the messages' own: a check-in counts from where its own claim got to.
    """
    cursors = cursors or {}
    if messages is None:  # only the ids and cursors are needed here
        messages = list(
            Message.objects.filter(customer_id=customer_id, status=Message.Status.SENDING).only(
                "id", "claim_after"
            )
        )
    exact_up_to = limits.batch_size * (limits.max_workers + 1)
    counted = 0
    with prepared.cursor() as cursor:
        for from_cursor in (True, False):
            counted = 0
            for message in messages:
                after = cursors.get(message.pk, message.claim_after) if from_cursor else 0
                cursor.execute(BACKLOG_SQL, [message.pk, after, exact_up_to + 1 - counted])
                counted += cursor.fetchone()[0]
                if counted > exact_up_to:
                    return max(counted, limits.per_minute + 1)
    return counted


def record(changes: Sequence[StatusChange], *, max_attempts: int) -> int:
    """Write a lease's outcomes in one statement; rows no longer leased keep what they have.

    The rows are found by primary key only, and "still leased" is checked per row inside the SET,
    not in the WHERE: leased rows are a sliver of the table that statistics never see, so a
    `status = 'leased'` filter makes the planner expect one row, scan the table for it and loop
    over the batch for each row found. Returns the number of rows matched.
    """
    if not changes:
        return 0
    # LEASED is a constant of ours, inlined so each guard needs no parameter of its own.
    leased = f"r.status = '{LEASED}'"

    def guarded(new: str, old: str) -> str:
        return f"CASE WHEN {leased} THEN {new} ELSE {old} END"

    new_status = """CASE
            WHEN u.status = %s AND r.attempts + 1 >= %s THEN %s
            WHEN u.status = %s THEN %s
            ELSE u.status END"""
    status_params = [RETRY, max_attempts, FAILED, RETRY, QUEUED]
    assignments = f"""
        status = {guarded(new_status, "r.status")},
        attempts = {guarded("r.attempts + u.attempted", "r.attempts")},
        provider_message_id = {
        guarded(
            "COALESCE(NULLIF(u.provider_id, ''), r.provider_message_id)", "r.provider_message_id"
        )
    },
        last_error = {guarded("COALESCE(NULLIF(u.error, ''), r.last_error)", "r.last_error")},
        sent_at = {guarded("COALESCE(u.sent_at, r.sent_at)", "r.sent_at")}
    """
    sql = f"""
        UPDATE sending_recipient AS r SET {assignments}
        FROM {_changes_sql()}
        WHERE r.id = u.id
    """  # noqa: S608 - constant SQL fragments only
    params = [*status_params, orjson.dumps(changes).decode()]
    with prepared.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _changes_sql() -> str:
    """The changes as rows `u` of one JSON text parameter (orjson writes the dataclasses as they
    are), not one array per column: psycopg quotes array elements one by one in Python."""
    if _is_postgres():
        return """(
                SELECT id, status, provider_id, error, attempted::int AS attempted,
                       to_timestamp(sent_at_ms / 1000.0) AS sent_at
                FROM jsonb_to_recordset(%s::jsonb) AS j(
                    id bigint, status text, provider_id text, error text, attempted boolean,
                    sent_at_ms bigint)
            ) AS u"""
    # SQLite's ->> reads a JSON true as 1
    return """(
                SELECT value ->> '$.id' AS id, value ->> '$.status' AS status,
                       value ->> '$.provider_id' AS provider_id, value ->> '$.error' AS error,
                       value ->> '$.attempted' AS attempted,
                       strftime('%%Y-%%m-%%d %%H:%%M:%%f', value ->> '$.sent_at_ms' / 1000.0,
                                'unixepoch') AS sent_at
                FROM json_each(%s)
            ) AS u"""


def record_late(
    changes: Sequence[StatusChange], *, lease_id: int, customer_id: int, max_attempts: int
) -> list[int]:
    """Write a late report's outcomes over `unknown` (one statement); returns the ids changed
    (an `unknown` outcome too: the row keeps its status and takes the attempt and its error).

    A row changes only while it is `unknown` and no later lease of the customer holds it: a
    recipient that was queued again (by the operator's "retry unknown", or by an earlier late
    report) and leased since belongs to that lease now, whatever this report says. So a late
    report never puts a recipient back in the queue that another lease may have sent.
    """
    if not changes:
        return []
    if _is_postgres():
        leased_since, returning = "l.recipient_ids @> to_jsonb(r.id)", "r.id"
    else:  # SQLite: RETURNING names the updated table's columns only, unqualified
        leased_since = "EXISTS (SELECT 1 FROM json_each(l.recipient_ids) e WHERE e.value = r.id)"
        returning = "id"
    sql = f"""
        UPDATE sending_recipient AS r SET
            status = CASE
                WHEN u.status = %s AND r.attempts + 1 >= %s THEN %s
                WHEN u.status = %s THEN %s
                ELSE u.status END,
            attempts = r.attempts + u.attempted,
            provider_message_id = COALESCE(NULLIF(u.provider_id, ''), r.provider_message_id),
            last_error = COALESCE(NULLIF(u.error, ''), r.last_error),
            sent_at = COALESCE(u.sent_at, r.sent_at)
        FROM {_changes_sql()}
        WHERE r.id = u.id AND r.status = %s
          AND NOT EXISTS (
              SELECT 1 FROM sending_lease l
              WHERE l.customer_id = %s AND l.id > %s AND {leased_since})
        RETURNING {returning}
    """  # noqa: S608 - constant SQL fragments only
    params = [
        RETRY,
        max_attempts,
        FAILED,
        RETRY,
        QUEUED,
        orjson.dumps(changes).decode(),
        UNKNOWN,
        customer_id,
        lease_id,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [row[0] for row in cursor.fetchall()]


def reopen_messages(recipient_ids: Sequence[int]) -> int:
    """Completed messages that have these recipients queued again (a late report said they were
    never sent) go back to sending (one statement); returns how many. Run outside a check-in's
    transaction, like `move_cursors`: it takes message row locks."""
    if not recipient_ids:
        return 0
    queued = Recipient.objects.filter(id__in=list(recipient_ids), status=QUEUED)
    return Message.objects.filter(
        status=Message.Status.COMPLETED, pk__in=queued.values("message_id")
    ).update(status=Message.Status.SENDING, completed_at=None)


def release(ids: Sequence[int], *, status: str) -> int:
    """Move still-leased recipients to `status` (QUEUED or UNKNOWN) in one statement, found by
    primary key only (see `record` for why "still leased" is not in the WHERE).

    Returns the number of rows matched.
    """
    if not ids:
        return 0
    return Recipient.objects.filter(id__in=list(ids)).update(
        status=Case(When(status=LEASED, then=Value(status)), default=F("status"))
    )


def requeue_unknown(*, message_id: int) -> int:
    """Queue a message's `unknown` recipients again (one statement): the operator's explicit
    retry, knowing each may get the email twice. Returns how many."""
    return Recipient.objects.filter(message_id=message_id, status=UNKNOWN).update(status=QUEUED)


def cancel_queued(*, message_ids: Sequence[int]) -> int:
    """Cancel the queued recipients of these messages (one statement); returns how many."""
    return Recipient.objects.filter(
        message_id__in=list(message_ids), status=Recipient.Status.QUEUED
    ).update(status=Recipient.Status.CANCELLED)


def in_order(ids: Sequence[int]) -> list[Recipient]:
    """These recipients, in the order given (a lease's order)."""
    rows = Recipient.objects.in_bulk(list(ids))
    return [rows[i] for i in ids]
