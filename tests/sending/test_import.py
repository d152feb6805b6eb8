"""Recipient import from CSV: the service, its PostgreSQL COPY path, and the admin page."""

import csv
import io

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.validators import validate_email
from django.urls import reverse
from hypothesis import example, given
from hypothesis import strategies as st

from customers.models import Customer
from sending.imports import (
    _PLAIN_EMAIL,
    MAX_LISTED_ERRORS,
    ImportRejected,
    import_recipients,
    is_valid_email,
)
from sending.models import Message, Recipient

pytestmark = pytest.mark.django_db


@pytest.fixture
def customer():
    return Customer.objects.create(name="Import U", slug="import-u", default_from_email="a@i.edu")


@pytest.fixture
def message(customer):
    return Message.objects.create(customer=customer, subject="Hi", text_body="Hi {{ first_name }}")


def upload(content: str | bytes, name: str = "recipients.csv") -> SimpleUploadedFile:
    data = content.encode() if isinstance(content, str) else content
    return SimpleUploadedFile(name, data, content_type="text/csv")


def rejected(message, content) -> ImportRejected:
    """The import's rejection; also checks that nothing was written."""
    before = list(Recipient.objects.values_list("id", "email"))
    with pytest.raises(ImportRejected) as caught:
        import_recipients(message=message, file=upload(content))
    assert list(Recipient.objects.values_list("id", "email")) == before
    return caught.value


def emails(message) -> list[str]:
    return list(message.recipients.order_by("id").values_list("email", flat=True))


# The service: what is imported ----------------------------------------------------------------


def test_imports_each_row_with_its_other_columns_as_merge_data(message):
    file = upload(" Email ,first_name, course\nada@example.edu,Ada, Maths \nbob@example.edu,Bob,\n")
    result = import_recipients(message=message, file=file)
    assert (result.imported, result.duplicates, result.duplicate_lines) == (2, 0, ())
    recipients = list(message.recipients.order_by("id").values("email", "merge_data", "status"))
    assert recipients == [
        {
            "email": "ada@example.edu",
            "merge_data": {"first_name": "Ada", "course": "Maths"},
            "status": "queued",
        },
        {
            "email": "bob@example.edu",
            "merge_data": {"first_name": "Bob", "course": ""},
            "status": "queued",
        },
    ]
    assert not file.closed


def test_email_column_may_stand_anywhere_in_any_case(message):
    import_recipients(message=message, file=upload("name,EMAIL\nAda,ada@example.edu\n"))
    assert list(message.recipients.values_list("email", "merge_data")) == [
        ("ada@example.edu", {"name": "Ada"})
    ]


def test_a_utf8_byte_order_mark_is_accepted(message):
    file = upload("\ufeffemail,name\nzoe@example.edu,Zoë\n".encode())
    assert import_recipients(message=message, file=file).imported == 1
    assert list(message.recipients.values_list("email", "merge_data")) == [
        ("zoe@example.edu", {"name": "Zoë"})
    ]


def test_blank_lines_are_ignored_and_missing_trailing_values_are_empty(message):
    result = import_recipients(
        message=message, file=upload("email,a,b\r\n\r\nx@example.edu,1\r\n,,\r\ny@example.edu\r\n")
    )
    assert result.imported == 2
    assert list(message.recipients.order_by("id").values_list("merge_data", flat=True)) == [
        {"a": "1", "b": ""},
        {"a": "", "b": ""},
    ]


def test_quoted_values_may_hold_commas_quotes_and_line_breaks(message):
    content = 'email,note\nx@example.edu,"one, ""two""\nthree"\ny@example.edu,plain\n'
    import_recipients(message=message, file=upload(content))
    assert message.recipients.get(email="x@example.edu").merge_data == {"note": 'one, "two"\nthree'}


def test_merge_values_are_stored_exactly_whatever_characters_they_hold(message):
    note = 'say "hi"\\n, C:\\temp\ttab \x01 Zoë 漢字 🎓\nsecond line'
    field = 'odd "name" \\ é'
    content = io.StringIO()
    csv.writer(content).writerows([["email", field], ["x@example.edu", note]])
    import_recipients(message=message, file=upload(content.getvalue()))
    assert message.recipients.get().merge_data == {field: note.strip()}


def test_addresses_that_only_the_full_validator_accepts_are_imported(message):
    content = 'email\n"""john..doe""@example.edu"\nuser@bücher.example\nuser@[192.0.2.1]\n'
    assert import_recipients(message=message, file=upload(content)).imported == 3
    assert emails(message) == [
        '"john..doe"@example.edu',
        "user@bücher.example",
        "user@[192.0.2.1]",
    ]


def test_duplicates_within_the_file_are_skipped_and_reported_by_line(message):
    content = "email,n\na@example.edu,1\nb@example.edu,2\nA@Example.EDU,3\nb@example.edu,4\n"
    result = import_recipients(message=message, file=upload(content))
    assert (result.imported, result.duplicate_lines) == (2, (4, 5))
    assert emails(message) == ["a@example.edu", "b@example.edu"]
    assert message.recipients.get(email="a@example.edu").merge_data == {"n": "1"}


def test_duplicates_of_recipients_already_on_the_message_are_skipped(message, customer):
    Recipient.objects.create(message=message, email="Old@Example.edu", merge_data={"n": "old"})
    other = Message.objects.create(customer=customer, subject="Other", text_body="x")
    Recipient.objects.create(message=other, email="new@example.edu")
    content = "email,n\nnew@example.edu,1\nold@example.edu,2\n"
    result = import_recipients(message=message, file=upload(content))
    assert (result.imported, result.duplicate_lines) == (1, (3,))
    assert emails(message) == ["Old@Example.edu", "new@example.edu"]
    assert message.recipients.get(email="Old@Example.edu").merge_data == {"n": "old"}


def test_a_second_import_adds_only_the_new_addresses(message):
    import_recipients(message=message, file=upload("email\na@example.edu\nb@example.edu\n"))
    result = import_recipients(
        message=message, file=upload("email\nB@example.edu\nc@example.edu\n")
    )
    assert (result.imported, result.duplicate_lines) == (1, (2,))
    assert emails(message) == ["a@example.edu", "b@example.edu", "c@example.edu"]


@pytest.mark.parametrize("status", ["draft", "scheduled"])
def test_draft_and_scheduled_messages_take_imports(message, status):
    Message.objects.filter(pk=message.pk).update(status=status, scheduled_at="2030-01-01T00:00Z")
    assert import_recipients(message=message, file=upload("email\na@example.edu\n")).imported == 1


def test_the_import_never_takes_a_query_per_row(message, django_assert_max_num_queries):
    content = "email,n\n" + "".join(f"r{i}@example.edu,{i}\n" for i in range(3_000))
    # PostgreSQL: the lock, the existing addresses, one COPY (not logged as a query).
    # SQLite: bulk_create writes about 120 rows a statement (999 parameters).
    with django_assert_max_num_queries(40):
        assert import_recipients(message=message, file=upload(content)).imported == 3_000


# The service: what is rejected, with nothing written ------------------------------------------


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (
            "email,name\nok@example.edu,A\nnot-an-address,B\n",
            "Line 3: “not-an-address” is not a valid email address.",
        ),
        ("email,name\nok@example.edu,A\n,B\n", "Line 3: no email address."),
        (
            "email,name\nok@example.edu,A\n" + "x" * 243 + "@example.edu,B\n",
            "Line 3: the address is longer than 254 characters.",
        ),
        (
            "email,name\nok@example.edu,A\nx@example.edu,Smith, Ann\n",
            "Line 3: 3 values, but the header names 2 columns. "
            "A value that contains a comma must be in double quotes.",
        ),
        (
            'email,name\nok@example.edu,"A\nx@example.edu,B\n',
            "Line 2: the CSV is malformed (unexpected end of data). Check the double quotes.",
        ),
        (
            "email,name\nok@example.edu,A\x00B\n",
            "Line 2: contains a NUL character: is this a text file?",
        ),
    ],
    ids=["invalid", "missing", "too-long", "extra-values", "open-quote", "nul"],
)
def test_a_bad_row_rejects_the_whole_file_with_its_line(message, content, error):
    Recipient.objects.create(message=message, email="kept@example.edu")
    assert rejected(message, content).errors == [error]
    assert emails(message) == ["kept@example.edu"]


def test_every_bad_row_is_listed_with_its_line(message):
    content = "email\na@example.edu\nbad one\nb@example.edu\n@example.edu\n\nc@\n"
    assert rejected(message, content).errors == [
        "Line 3: “bad one” is not a valid email address.",
        "Line 5: “@example.edu” is not a valid email address.",
        "Line 7: “c@” is not a valid email address.",
    ]


def test_the_listing_stops_at_a_hundred_and_counts_the_rest(message):
    content = "email\n" + "nobody\n" * 250
    problem = rejected(message, content)
    assert len(problem.errors) == MAX_LISTED_ERRORS
    assert problem.errors[-1] == "Line 101: “nobody” is not a valid email address."
    assert (problem.error_count, problem.unlisted_count) == (250, 150)


def test_a_file_that_is_not_utf8_is_rejected_with_the_first_bad_line(message):
    content = "email,name\na@example.edu,Ann\nb@example.edu,Zoë\n".encode("latin-1")
    assert rejected(message, content).errors == [
        "The file is not UTF-8 text (line 3 is not). Save it as “CSV UTF-8” "
        "(in Excel: File > Save As > CSV UTF-8) and import it again."
    ]


def test_a_utf16_file_is_not_taken_for_utf8(message):
    problem = rejected(message, "email\na@example.edu\n".encode("utf-16"))
    assert problem.errors[0].startswith("The file is not UTF-8 text (line 1 is not).")


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\n\r\n \n"], ids=["0", "bom", "blank"])
def test_an_empty_file_is_rejected(message, content):
    assert rejected(message, content).errors == ["The file is empty."]


def test_a_header_without_recipients_is_rejected(message):
    assert rejected(message, "email,name\n\n").errors == [
        "The file has a header line but no recipients."
    ]


def test_a_file_without_a_header_line_is_rejected_naming_the_columns_found(message):
    assert rejected(message, "ada@example.edu,Ada\nbob@example.edu,Bob\n").errors == [
        "Line 1 must name the columns, one of them “email”; the columns found are "
        "“ada@example.edu”, “Ada”. The file seems to have no header line: add one, "
        "e.g. email,first_name."
    ]


def test_a_header_without_an_email_column_names_the_columns_found(message):
    assert rejected(message, "e-mail,name\na@example.edu,A\n").errors == [
        "Line 1 must name the columns, one of them “email”; the columns found are “e-mail”, “name”."
    ]


def test_a_semicolon_separated_file_gets_a_hint(message):
    (error,) = rejected(message, "email;name\na@example.edu;A\n").errors
    assert error.endswith("The columns seem to be separated by “;” or tabs: use commas.")


def test_header_columns_must_be_named_once(message):
    assert rejected(message, "email,name,,Name,name,EMAIL\n").errors == [
        "The header has more than one “email” column: “email”, “name”, “”, “Name”, “name”, "
        "“EMAIL”.",
        "Column 3 of the header has no name: name it (it becomes a merge field) or delete "
        "the column.",
        "The header names the column “name” more than once.",
    ]


def test_a_file_over_the_size_limit_is_rejected(message, settings):
    settings.RECIPIENT_IMPORT_MAX_BYTES = 1024
    content = "email\n" + "".join(f"r{i}@example.edu\n" for i in range(100))
    assert rejected(message, content).errors == [
        "The file is 1.6\xa0KB; the largest accepted is 1.0\xa0KB. Split it and import each part."
    ]


@pytest.mark.parametrize("status", ["sending", "paused", "completed", "cancelled"])
def test_a_message_whose_content_is_frozen_takes_no_import(message, status):
    Message.objects.filter(pk=message.pk).update(status=status)
    assert rejected(message, "email\na@example.edu\n").errors == [
        "Recipients can only be added to a draft or scheduled message; this one is "
        f"{status}, and its content is frozen."
    ]


def test_the_status_is_read_from_the_database_not_the_callers_copy(message):
    Message.objects.filter(pk=message.pk).update(status="sending")
    assert message.status == "draft"
    rejected(message, "email\na@example.edu\n")


# Email validation -----------------------------------------------------------------------------


# Address-shaped strings, near misses included: dots and dashes at the edges, long labels,
# digits in the TLD.
_ATOMS = st.lists(
    st.text("-!#$%&'*+/=?^_`{}|~aZ09", min_size=1, max_size=6), min_size=1, max_size=3
)
_LOCAL = st.builds(
    lambda edge, atoms: edge + ".".join(atoms), st.sampled_from(["", "", "."]), _ATOMS
)
_VALID_LABEL = st.text("aZ09", min_size=1, max_size=8)
_LABEL = st.one_of(
    _VALID_LABEL,
    _VALID_LABEL,
    st.text("aZ09-", min_size=1, max_size=8),
    st.just("a" * 63),
    st.just("a" * 64),
)
_TLD = st.one_of(
    st.text("aZ", min_size=2, max_size=6),
    st.text("aZ-", min_size=1, max_size=6),
    st.text("aZ09", min_size=1, max_size=6),
)
_ADDRESSES = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join([*labels, tld])}",
    _LOCAL,
    st.lists(_LABEL, min_size=1, max_size=3),
    _TLD,
)


@given(_ADDRESSES)
@example("a@x.-b.edu")
@example("a@x.b-.edu")
@example("a@-x.edu")
@example("a@x.edu-")
@example("a@x.e")
@example("a@x.c0m")
@example(".a@x.edu")
@example("a.@x.edu")
@example("a@" + "x" * 64 + ".edu")
@example("a@x." + "y" * 64 + ".edu")
def test_the_fast_check_accepts_only_what_emailvalidator_accepts(value):
    if _PLAIN_EMAIL.fullmatch(value):
        validate_email(value)  # raises if the fast check let an invalid address through


@pytest.mark.parametrize(
    "value",
    [
        "a@example.edu",
        "first.last+tag@sub.example.co.uk",
        "o'neil@example.ie",
        "x@xn--bcher-kva.de",
    ],
)
def test_ordinary_addresses_are_valid(value):
    assert is_valid_email(value)


@pytest.mark.parametrize(
    "value", ["a@", "@example.edu", "a@b", "a..b@example.edu", "a@-example.edu", "a @example.edu"]
)
def test_malformed_addresses_are_invalid(value):
    assert not is_valid_email(value)
    with pytest.raises(ValidationError):
        validate_email(value)


# PostgreSQL: the COPY path --------------------------------------------------------------------


def test_copy_loads_many_rows_in_file_order(postgres, message):
    Recipient.objects.create(message=message, email="r5000@EXAMPLE.edu")
    rows = [f"r{i}@example.edu,{i},Course {i % 7}" for i in range(12_000)]
    rows.insert(3, "R2@example.edu,dup,x")
    content = "email,n,course\n" + "\n".join(rows) + "\n"
    result = import_recipients(message=message, file=upload(content))
    # r2 repeated at line 5; r5000 (line 5003) was already on the message.
    assert (result.imported, result.duplicate_lines) == (11_999, (5, 5003))
    loaded = list(message.recipients.order_by("id").values_list("email", "merge_data"))
    assert len(loaded) == 12_000
    assert loaded[1] == ("r0@example.edu", {"n": "0", "course": "Course 0"})
    assert loaded[-1] == ("r11999@example.edu", {"n": "11999", "course": "Course 1"})
    assert [email for email, _ in loaded[1:]] == [
        f"r{i}@example.edu" for i in range(12_000) if i != 5000
    ]


def test_copy_writes_nothing_when_a_late_row_is_bad(postgres, message):
    rows = [f"r{i}@example.edu" for i in range(15_000)] + ["broken"]
    problem = rejected(message, "email\n" + "\n".join(rows) + "\n")
    assert problem.errors == ["Line 15002: “broken” is not a valid email address."]
    assert not message.recipients.exists()


def test_copy_writes_nothing_when_the_file_turns_out_not_to_be_utf8(postgres, message):
    content = b"email\n" + b"".join(b"r%d@example.edu\n" % i for i in range(15_000)) + b"\xff@x\n"
    assert (
        rejected(message, content)
        .errors[0]
        .startswith("The file is not UTF-8 text (line 15002 is not).")
    )


def test_addresses_postgresql_folds_together_are_duplicates_too(postgres, message):
    with postgres.cursor() as cursor:
        cursor.execute("SELECT lower('a@İx.example') = lower('a@ix.example')")
        (folds,) = cursor.fetchone()
    if not folds:
        pytest.skip("this database's locale does not fold İ to i")
    # Python's lower() keeps these apart, the unique index does not: the slower path decides.
    content = "email,n\na@İx.example,1\nb@example.edu,2\na@ix.example,3\n"
    result = import_recipients(message=message, file=upload(content))
    assert (result.imported, result.duplicate_lines) == (2, (4,))
    assert emails(message) == ["a@İx.example", "b@example.edu"]


# The admin page -------------------------------------------------------------------------------


def import_url(message) -> str:
    return reverse("admin:sending_message_import", args=[message.pk])


@pytest.fixture
def importer(client):
    """A staff user with exactly the permissions the page needs, logged in."""
    user = get_user_model().objects.create_user("importer", password="x", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="sending",
            codename__in=["add_recipient", "change_message", "view_message"],
        )
    )
    client.force_login(user)
    return client


def test_the_page_shows_the_form_and_the_expected_format(importer, message):
    response = importer.get(import_url(message))
    assert response.status_code == 200
    page = response.content.decode()
    assert 'enctype="multipart/form-data"' in page
    assert 'type="file" name="file"' in page
    assert "email,first_name,course" in page  # the example
    assert reverse("admin:sending_message_change", args=[message.pk]) in page  # breadcrumbs
    assert "Import recipients" in page


def test_posting_a_good_file_imports_and_returns_to_the_message(importer, message):
    content = "email,first_name\na@example.edu,Ann\nb@example.edu,Bob\nA@example.edu,Again\n"
    response = importer.post(import_url(message), {"file": upload(content)})
    assert response.status_code == 302
    assert response.url == reverse("admin:sending_message_change", args=[message.pk])
    assert emails(message) == ["a@example.edu", "b@example.edu"]
    summary = "Imported 2 recipients from recipients.csv. Skipped 1 duplicate (line 4)."
    assert [str(m) for m in get_messages(response.wsgi_request)] == [summary]
    entry = LogEntry.objects.get(object_id=str(message.pk))
    assert (entry.user.username, entry.get_change_message()) == ("importer", summary)


def test_a_file_of_nothing_new_warns_and_lists_the_first_duplicate_lines(importer, message):
    Recipient.objects.create(message=message, email="a@example.edu")
    content = "email\n" + "A@example.edu\n" * 25
    response = importer.post(import_url(message), {"file": upload(content)})
    assert response.status_code == 302
    [notice] = get_messages(response.wsgi_request)
    assert notice.level_tag == "warning"
    lines = ", ".join(str(line) for line in range(2, 22))
    assert str(notice) == (
        f"Imported 0 recipients from recipients.csv. Skipped 25 duplicates (lines {lines} and "
        "5 more)."
    )


def test_posting_a_bad_file_shows_every_problem_and_imports_nothing(importer, message):
    content = "email\na@example.edu\nnope\nb@example.edu\nalso nope\n"
    response = importer.post(import_url(message), {"file": upload(content)})
    assert response.status_code == 400
    page = response.content.decode()
    assert "Nothing was imported." in page
    assert "Line 3: “nope” is not a valid email address." in page
    assert "Line 5: “also nope” is not a valid email address." in page
    assert not message.recipients.exists()


def test_the_page_escapes_what_the_file_says(importer, message):
    response = importer.post(import_url(message), {"file": upload("email\n<b>x</b>\n")})
    assert response.status_code == 400
    assert "“&lt;b&gt;x&lt;/b&gt;” is not a valid email address." in response.content.decode()


def test_posting_without_a_file_asks_for_one(importer, message):
    response = importer.post(import_url(message), {})
    assert response.status_code == 400
    assert "This field is required." in response.content.decode()


def test_the_page_of_a_frozen_message_says_so(importer, message):
    Message.objects.filter(pk=message.pk).update(status="sending")
    assert "nothing can be imported" in importer.get(import_url(message)).content.decode()
    response = importer.post(import_url(message), {"file": upload("email\na@example.edu\n")})
    assert response.status_code == 400
    assert "this one is sending, and its content is frozen." in response.content.decode()
    assert not message.recipients.exists()


@pytest.mark.parametrize("missing", ["add_recipient", "change_message"])
def test_the_page_needs_both_permissions(importer, message, missing):
    user = get_user_model().objects.get(username="importer")
    user.user_permissions.remove(Permission.objects.get(codename=missing))
    assert importer.get(import_url(message)).status_code == 403
    response = importer.post(import_url(message), {"file": upload("email\na@example.edu\n")})
    assert response.status_code == 403
    assert not message.recipients.exists()


def test_an_unknown_message_is_not_found(importer, message):
    url = reverse("admin:sending_message_import", args=[message.pk + 1000])
    assert importer.get(url).status_code == 404


def test_the_page_is_for_staff_only(client, message):
    response = client.get(import_url(message))
    assert response.status_code == 302
    assert response.url.startswith(reverse("admin:login"))
