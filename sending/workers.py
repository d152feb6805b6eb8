"""Worker rows: the check-in's lock on its worker, what a check-in writes back to it, and the
customer's provider account a replayed answer is rebuilt with.

SQL rather than the ORM on the check-in path (docs/benchmarks.md, check-in CPU); each statement
is checked against the ORM's result in tests/sending/test_statements.py.
"""

from django.db import connection

from customers.models import Customer

from . import prepared
from .models import Worker

# What a check-in changes on its worker's row.
CHECKIN_FIELDS = (
    "state",
    "stop_reason",
    "stopped_at",
    "request_id",
    "last_seq",
    "last_response",
    "last_checkin_at",
    "rate_per_s",
    "throttled_minute",
)


def lock(worker_id: int) -> Worker | None:
    """The worker's row under its row lock (held until the transaction ends), or None."""
    lock_clause = " FOR UPDATE" if connection.features.has_select_for_update else ""
    table = connection.ops.quote_name(Worker._meta.db_table)
    rows = Worker.objects.raw(f"SELECT * FROM {table} WHERE id = %s{lock_clause}", [worker_id])  # noqa: S608
    return next(iter(rows), None)


def save_checkin(worker: Worker) -> None:
    """Write the check-in's fields of the worker (what `save(update_fields=CHECKIN_FIELDS)`
    writes), each value prepared by its own field."""
    fields = [Worker._meta.get_field(name) for name in CHECKIN_FIELDS]
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(f.column)} = %s" for f in fields)
    params = [f.get_db_prep_save(getattr(worker, f.attname), connection) for f in fields]
    with prepared.cursor() as cursor:
        cursor.execute(
            f"UPDATE {quote(Worker._meta.db_table)} SET {assignments} WHERE id = %s",  # noqa: S608
            [*params, worker.pk],
        )


def customer_with_account(customer_id: int) -> Customer:
    """The worker's customer and its provider account (a replayed answer's provider block: the
    stored answer never keeps one, it would keep the credentials)."""
    return Customer.objects.select_related("provider_account").get(pk=customer_id)
