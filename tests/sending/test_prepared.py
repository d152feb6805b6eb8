"""The worker API's hot statements are prepared on PostgreSQL (sending/prepared.py), and a
prepared claim stays on the claim index when PostgreSQL plans it once for every value."""

import re

import pytest
from django.db import connection

from sending import prepared, queue
from sending.models import Recipient
from tests.factories import make_customer, make_message


def _prepared_statements() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]


def test_a_claim_is_prepared_on_its_connection(postgres):
    customer = make_customer("prepared")
    message = make_message(customer, 3)
    result = queue.claim(customer_id=customer.pk, message_id=message.pk, after_id=0, limit=2)
    assert len(result.leased) == 2
    assert any("SKIP LOCKED" in s and "sending_recipient" in s for s in _prepared_statements())


def test_nothing_is_prepared_when_turned_off(postgres):
    """DATABASE_PREPARED_STATEMENTS=false leaves psycopg's threshold None: Django's cursor."""
    connection.ensure_connection()
    threshold = connection.connection.prepare_threshold
    try:
        connection.connection.prepare_threshold = None
        with prepared.cursor() as cursor:
            # Django's own cursor: binding on the client too, as everywhere else.
            assert not isinstance(cursor.cursor, prepared._PreparingCursor)
            cursor.execute("SELECT 1 AS unprepared_probe")
    finally:
        connection.connection.prepare_threshold = threshold
    with prepared.cursor() as cursor:
        cursor.execute("SELECT 1 AS prepared_probe")
    statements = _prepared_statements()
    assert not any("unprepared_probe" in s for s in statements)
    assert any("prepared_probe" in s for s in statements)


def _generic_plan(sql: str, args: list) -> str:
    """EXPLAIN of `sql` as PostgreSQL plans a prepared statement for every value at once."""
    numbers = iter(range(1, 100))
    numbered = re.sub("%s", lambda _: f"${next(numbers)}", sql)
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute(f"PREPARE generic_probe AS {numbered}")
        try:
            cursor.execute(f"EXPLAIN EXECUTE generic_probe({', '.join(map(str, args))})")
            return "\n".join(row[0] for row in cursor.fetchall())
        finally:
            cursor.execute("DEALLOCATE generic_probe")


@pytest.fixture
def a_message_mostly_sent(postgres):
    """A message well into its send (most of its recipients sent), with the table's statistics
    taken, so that the planner weighs the indexes as it does in production rather than on an
    empty table."""
    customer = make_customer("generic-plan")
    message = make_message(customer, 5_000)
    Recipient.objects.filter(
        message=message, id__lt=message.recipients.order_by("id")[4_500].id
    ).update(status=Recipient.Status.SENT)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sending_recipient")
    return customer, message


@pytest.mark.parametrize(
    ("sql", "args"),
    [
        (queue.claim_sql, ["message", 0, 500, "customer"]),
        (lambda: queue.BACKLOG_SQL, ["message", 0, 500]),
    ],
    ids=["claim", "backlog"],
)
def test_a_generic_plan_uses_the_claim_index(a_message_mostly_sent, sql, args):
    """The queued status is written into the statements: as a parameter, no generic plan could
    use the partial index (its predicate is `status = 'queued'`)."""
    customer, message = a_message_mostly_sent
    ids = {"message": message.pk, "customer": customer.pk}
    args = [ids.get(a, a) for a in args]
    assert "recipient_claim_queue" in _generic_plan(sql(), args)
    with_a_parameter = sql().replace("status = 'queued'", "status = %s")
    assert "recipient_claim_queue" not in _generic_plan(
        with_a_parameter, [args[0], "'queued'", *args[1:]]
    )
