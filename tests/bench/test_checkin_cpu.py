"""bench.checkin_cpu's set-up: shuffled addresses through the real import, and the backend's CPU."""

from __future__ import annotations

import itertools

from bench import checkin_cpu
from sending.models import Message
from tests.conftest import _missing
from tests.factories import make_customer


def test_shuffled_addresses_come_through_the_import_in_file_order(postgres):
    message = Message.objects.create(customer=make_customer(), subject="S", text_body="T")
    checkin_cpu._import_shuffled(message, 2_000)
    rows = list(message.recipients.order_by("id").values_list("email", "status", "merge_data"))
    emails = [email for email, _, _ in rows]
    assert len(set(emails)) == 2_000
    assert {status for _, status, _ in rows} == {"queued"}
    # Ids follow the CSV's random order, not the unique index's address order.
    assert emails != sorted(emails)
    in_order = sum(a < b for a, b in itertools.pairwise(emails))
    assert 800 < in_order < 1_200
    number = int(emails[0].split("@")[0].removeprefix("student."))
    assert rows[0][2] == {"first_name": f"Student {number}"}
    # The same order on every run, so runs compare.
    again = Message.objects.create(customer=message.customer, subject="S", text_body="T")
    checkin_cpu._import_shuffled(again, 2_000)
    prefixes = list(again.recipients.order_by("id").values_list("email", flat=True))
    assert [e.split("@")[0] for e in prefixes] == [e.split("@")[0] for e in emails]


def test_the_backend_cpu_is_read_and_grows_with_work(postgres):
    before = checkin_cpu._backend_cpu_s()
    if before is None:
        _missing("PostgreSQL runs elsewhere: its backend has no /proc entry here")
    with postgres.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM generate_series(1, 3000000)")
    after = checkin_cpu._backend_cpu_s()
    assert after > before
