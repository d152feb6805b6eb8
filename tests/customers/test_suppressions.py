"""The suppression list: CSV import (all or nothing), export that imports again, resubscribe
with a reason, recorded."""

import io

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from customers import suppression_csv, suppressions
from customers.models import Resubscription, Suppression
from sending.imports import ImportRejected
from tests.factories import CustomerFactory, SuppressionFactory, UserFactory

pytestmark = pytest.mark.django_db


def upload(content: bytes, name="list.csv"):
    file = io.BytesIO(content)
    file.name = name
    return file


def test_an_import_adds_new_addresses_with_their_reasons_and_skips_known_ones():
    customer = CustomerFactory()
    SuppressionFactory(customer=customer, email="old@example.edu", reason="complaint")
    other = CustomerFactory()
    SuppressionFactory(customer=other, email="ada@example.edu")  # another customer's list

    result = suppression_csv.import_suppressions(
        customer=customer,
        file=upload(
            b"Email,reason,source\n"
            b"ADA@example.edu,unsubscribed,phone call\n"
            b"grace@example.edu,,\n"
            b"OLD@example.edu,manual,\n"
            b"ada@example.edu,manual,again\n"
        ),
    )

    assert (result.imported, result.duplicate_lines) == (2, (4, 5))
    rows = Suppression.objects.filter(customer=customer).values_list("email", "reason", "source")
    assert sorted(rows) == [
        ("ada@example.edu", "unsubscribed", "phone call"),
        ("grace@example.edu", "manual", "CSV import: list.csv"),
        ("old@example.edu", "complaint", ""),
    ]


def test_a_bad_line_rejects_the_whole_file_and_lists_the_problems():
    customer = CustomerFactory()
    with pytest.raises(ImportRejected) as caught:
        suppression_csv.import_suppressions(
            customer=customer,
            file=upload(
                b"email,reason\nada@example.edu,unsubscribed\nnope,manual\n"
                b"grace@example.edu,bounced\n"
            ),
        )
    assert caught.value.errors[0] == "Line 3: “nope” is not a valid email address."
    assert not Suppression.objects.exists()


def test_a_bad_reason_alone_rejects_the_file():
    customer = CustomerFactory()
    with pytest.raises(ImportRejected) as caught:
        suppression_csv.import_suppressions(
            customer=customer, file=upload(b"email,reason\nada@example.edu,bounced\n")
        )
    assert caught.value.errors == [
        "Line 2: “bounced” is not a reason: use one of complaint, hard_bounce, manual, "
        "unsubscribed."
    ]
    assert not Suppression.objects.exists()


def test_an_export_imports_again_as_it_is():
    source, target = CustomerFactory(), CustomerFactory()
    SuppressionFactory(customer=source, email="b@example.edu", reason="hard_bounce",
                       source="=HYPERLINK(evil)")  # fmt: skip
    SuppressionFactory(customer=source, email="a@example.edu", reason="unsubscribed")

    exported = "".join(suppression_csv.export_rows(Suppression.objects.filter(customer=source)))
    lines = exported.splitlines()
    assert lines[0] == "email,reason,source,created_at"
    assert lines[1].startswith("a@example.edu,unsubscribed,,")
    assert lines[2].startswith("b@example.edu,hard_bounce,'=HYPERLINK(evil),")

    result = suppression_csv.import_suppressions(customer=target, file=upload(exported.encode()))
    assert result.imported == 2
    assert sorted(Suppression.objects.filter(customer=target).values_list("email", "reason")) == [
        ("a@example.edu", "unsubscribed"),
        ("b@example.edu", "hard_bounce"),
    ]


def test_resubscribe_needs_a_reason_and_leaves_a_record(staff_groups):
    user = UserFactory(groups=["Support"])
    row = SuppressionFactory(email="ada@example.edu", reason="unsubscribed", source="link")

    with pytest.raises(ValidationError):
        suppressions.resubscribe(suppression_id=row.pk, reason="  ", user=user)
    assert Suppression.objects.filter(pk=row.pk).exists()

    record = suppressions.resubscribe(
        suppression_id=row.pk, reason="She asked on the phone", user=user
    )

    assert not Suppression.objects.filter(pk=row.pk).exists()
    assert Resubscription.objects.get() == record
    assert (record.email, record.customer_id, record.created_by, record.suppressed_reason) == (
        "ada@example.edu",
        row.customer_id,
        user,
        "unsubscribed",
    )


def test_resubscribe_needs_the_permission(staff_groups):
    row = SuppressionFactory()
    with pytest.raises(PermissionDenied):
        suppressions.resubscribe(
            suppression_id=row.pk, reason="why not", user=UserFactory(groups=["Operators"])
        )
    assert Suppression.objects.filter(pk=row.pk).exists()


def test_suppress_is_idempotent_and_counts_new_rows():
    customer = CustomerFactory()
    assert suppressions.suppress(customer_id=customer.pk, emails=["A@x.edu"], reason="manual") == 1
    again = suppressions.suppress(
        customer_id=customer.pk, emails=["a@x.edu", "b@x.edu"], reason="complaint"
    )
    assert again == 1
    assert dict(Suppression.objects.values_list("email", "reason")) == {
        "a@x.edu": "manual",
        "b@x.edu": "complaint",
    }
