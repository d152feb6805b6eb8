"""A cursor for the worker API's hand-written SQL that PostgreSQL parses and plans once.

Django binds parameters on the client and never prepares a statement (its ORM cannot promise
SQL that prepares well, and prepared statements trouble some connection poolers). For the
statements every check-in and progress call runs, that cost is the server's to pay again each
time: planning alone was 1.5 ms of PostgreSQL's CPU per check-in (docs/benchmarks.md, eighth
session), and quoting the parameters into the SQL text about 4 % of the web process's CPU (in a
py-spy profile of `bench.worker_api`).
`cursor()` gives those statements a psycopg cursor that binds on the server and prepares each
statement on its connection the first time it runs there.

The SQL run through it is ours and constant: a statement text is prepared once a connection.
Values a partial index's predicate must match (a recipient's status) are written into the
text, never passed as parameters: a prepared statement's generic plan cannot use
`recipient_claim_queue` for `status = $2`.

`DATABASE_PREPARED_STATEMENTS=false` turns it off (Django's cursor, as everywhere else), for a
pooler in transaction mode that does not track prepared statements: psycopg then prepares
nothing (the connection's `prepare_threshold` is None, emailops/settings.py). SQLite: Django's
cursor.
"""

import psycopg
from django.db import connection


class _PreparingCursor(psycopg.Cursor):
    """Server-side binding, and every statement prepared on its connection."""

    def execute(self, query, params=None, *, prepare=None, binary=None):
        return super().execute(query, params, prepare=True, binary=binary)


def cursor():
    """A cursor to use as `connection.cursor()` is (a context manager; statements logged and
    errors wrapped as Django's are)."""
    if connection.vendor != "postgresql":
        return connection.cursor()
    # What `connection.cursor()` does before it makes a cursor (BaseDatabaseWrapper._cursor).
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    if connection.connection.prepare_threshold is None:
        return connection.cursor()
    with connection.wrap_database_errors:
        raw = _PreparingCursor(connection.connection)
    if connection.queries_logged:
        return connection.make_debug_cursor(raw)
    return connection.make_cursor(raw)
