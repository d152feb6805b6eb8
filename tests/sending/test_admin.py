import csv
import io

import pytest
from django.contrib.admin.sites import site
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from sending.admin.recipients import CappedCountPaginator
from sending.models import Message, Recipient
from sending.selectors import progress_of
from tests.factories import CustomerFactory, MessageFactory, RecipientFactory

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:sending_message_changelist"


def _message_form(message=None, **changes):
    data = {
        "customer": message.customer_id if message else "",
        "subject": message.subject if message else "",
        "from_email": "",
        "reply_to": "",
        "text_body": message.text_body if message else "",
        "html_body": message.html_body if message else "",
        "scheduled_at_0": "",
        "scheduled_at_1": "",
    }
    data.update(changes)
    return data


def _with_recipients(message, **counts):
    """Recipients of `message`: _with_recipients(m, sent=3, queued=2)."""
    for status, n in counts.items():
        RecipientFactory.create_batch(n, message=message, status=status)
    return message


# Messages: list -----------------------------------------------------------------------------


def _changelist_queries(client) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get(reverse(CHANGELIST)).status_code == 200
    return len(captured)


def test_message_list_takes_the_same_queries_for_more_messages(
    admin_client, django_assert_max_num_queries
):
    customer = CustomerFactory()
    for _ in range(2):
        _with_recipients(MessageFactory(customer=customer), sent=2, queued=1)
    few = _changelist_queries(admin_client)

    for _ in range(6):
        _with_recipients(MessageFactory(customer=CustomerFactory()), sent=1, failed=1)
    assert _changelist_queries(admin_client) == few
    # Session, user, count, the page (with every count), the customer filter, date hierarchy.
    with django_assert_max_num_queries(8):
        admin_client.get(reverse(CHANGELIST))


def test_message_list_shows_counts_by_status_and_progress(admin_client):
    message = _with_recipients(MessageFactory(), sent=3, failed=1, queued=3, leased=1)
    response = admin_client.get(reverse(CHANGELIST))
    progress = progress_of(response.context["cl"].result_list[0])
    assert progress.total == 8
    assert progress.by_status == {
        "queued": 3,
        "leased": 1,
        "sent": 3,
        "failed": 1,
        "unknown": 0,
        "cancelled": 0,
        "suppressed": 0,
    }
    page = response.content.decode()
    assert 'max="8" value="4"' in page and "</progress> 50%" in page  # 4 of 8 finished
    assert "Sent&nbsp;3" in page
    assert f"message__id__exact={message.pk}&amp;status__exact=failed" in page


def test_message_list_filters_by_customer_and_status_and_searches_subjects(admin_client):
    kept = MessageFactory(subject="Graduation", status="completed")
    MessageFactory(subject="Graduation", status="draft")
    MessageFactory(subject="Enrolment", customer=kept.customer, status="completed")
    response = admin_client.get(
        reverse(CHANGELIST),
        {"customer__id__exact": kept.customer_id, "status__exact": "completed", "q": "gradu"},
    )
    assert list(response.context["cl"].result_list) == [kept]


def test_an_empty_message_shows_no_progress_rather_than_failing(admin_client):
    MessageFactory()
    response = admin_client.get(reverse(CHANGELIST))
    assert 'max="1" value="0"' in response.content.decode()


# Messages: add and change -------------------------------------------------------------------


def test_a_message_added_in_admin_records_who_created_it(admin_client, admin_user):
    customer = CustomerFactory()
    response = admin_client.post(
        reverse("admin:sending_message_add"),
        _message_form(customer=customer.pk, subject="Hello", text_body="Hi {{ first_name }}"),
    )
    assert response.status_code == 302
    message = Message.objects.get()
    assert message.created_by == admin_user
    assert message.status == "draft"


def test_a_template_error_is_shown_on_its_field_with_its_line(admin_client):
    message = MessageFactory()
    url = reverse("admin:sending_message_change", args=[message.pk])
    response = admin_client.post(
        url, _message_form(message, html_body="<p>Hello</p>\n\n<p>{% if %}</p>")
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["html_body"]
    assert "line 3" in errors["html_body"][0]
    message.refresh_from_db()
    assert "{% if %}" not in message.html_body


def test_draft_content_can_be_edited(admin_client):
    message = MessageFactory(subject="Old")
    url = reverse("admin:sending_message_change", args=[message.pk])
    assert admin_client.post(url, _message_form(message, subject="New")).status_code == 302
    message.refresh_from_db()
    assert message.subject == "New"


@pytest.mark.parametrize("status", ["sending", "paused", "completed", "cancelled"])
def test_content_is_read_only_once_a_send_starts(admin_client, rf, admin_user, status):
    message = MessageFactory(subject="Frozen", status=status)
    request = rf.get("/")
    request.user = admin_user
    readonly = site._registry[Message].get_readonly_fields(request, message)
    assert set(Message.CONTENT_FIELDS) <= set(readonly)

    url = reverse("admin:sending_message_change", args=[message.pk])
    admin_client.post(url, _message_form(message, subject="Changed", text_body="Changed"))
    message.refresh_from_db()
    assert (message.subject, message.status) == ("Frozen", status)
    page = admin_client.get(url).content.decode()
    assert 'name="subject"' not in page


def test_status_is_never_edited_in_the_form(admin_client):
    message = MessageFactory()
    url = reverse("admin:sending_message_change", args=[message.pk])
    admin_client.post(url, _message_form(message, status="completed"))
    message.refresh_from_db()
    assert message.status == "draft"


def test_change_page_previews_the_message_for_the_first_recipient(admin_client):
    message = MessageFactory(
        subject="Hello {{ first_name }}",
        text_body="Dear {{ first_name }} & co",
        html_body='<p class="x">Dear {{ first_name }}</p>',
    )
    RecipientFactory(message=message, email="first@example.edu", merge_data={"first_name": "<Ada>"})
    RecipientFactory(message=message, email="second@example.edu", merge_data={"first_name": "Bob"})
    page = admin_client.get(reverse("admin:sending_message_change", args=[message.pk]))
    page = page.content.decode()

    assert "first@example.edu (the first recipient)" in page
    assert "Hello &lt;Ada&gt;" in page  # subject, escaped for the admin page
    assert "<pre>Dear &lt;Ada&gt; &amp; co</pre>" in page
    # The HTML body lives in a sandboxed iframe, served with a policy of its own (see below).
    preview_url = reverse("admin:sending_message_preview", args=[message.pk])
    assert '<iframe sandbox="" referrerpolicy="no-referrer"' in page
    assert f'src="{preview_url}"' in page
    assert "<Ada>" not in page
    assert "Bob" not in page

    preview = admin_client.get(preview_url)
    # The body's own autoescaping of the merge field, as the recipient gets it.
    assert preview.content.decode() == '<p class="x">Dear &lt;Ada&gt;</p>'
    policy = preview["Content-Security-Policy"]
    assert "sandbox" in policy and "script-src" not in policy and "default-src 'none'" in policy
    assert preview["X-Frame-Options"] == "SAMEORIGIN"


def test_change_page_links_to_import_and_to_the_recipients(admin_client):
    message = _with_recipients(MessageFactory(), queued=2, sent=1)
    page = admin_client.get(reverse("admin:sending_message_change", args=[message.pk]))
    page = page.content.decode()
    import_url = reverse("admin:sending_message_import", args=[message.pk])
    assert import_url == f"/admin/sending/message/{message.pk}/import/"
    assert f'href="{import_url}"' in page
    recipients = reverse("admin:sending_recipient_changelist")
    assert f"{recipients}?message__id__exact={message.pk}" in page
    assert "Queued: 2" in page
    assert "Sent: 1" in page


def test_a_message_without_recipients_says_how_to_import_them(admin_client):
    message = MessageFactory()
    page = admin_client.get(reverse("admin:sending_message_change", args=[message.pk]))
    page = page.content.decode()
    assert "No recipients yet." in page
    assert "Import recipients</a> to upload a CSV" in page
    assert "no recipient yet: merge fields render empty" in page


def test_a_frozen_message_offers_no_import(admin_client):
    message = MessageFactory(status="completed")
    page = admin_client.get(reverse("admin:sending_message_change", args=[message.pk]))
    assert reverse("admin:sending_message_import", args=[message.pk]) not in page.content.decode()


def test_the_import_url_serves_the_import_page(admin_client):
    message = MessageFactory()
    page = admin_client.get(reverse("admin:sending_message_import", args=[message.pk]))
    assert page.status_code == 200
    assert 'type="file"' in page.content.decode()


def test_deleting_a_message_counts_its_recipients_instead_of_listing_them(admin_client):
    message = _with_recipients(MessageFactory(), queued=30)
    url = reverse("admin:sending_message_delete", args=[message.pk])
    page = admin_client.get(url).content.decode()
    assert "30 recipients" in page
    assert "student" not in page  # no recipient listed one by one
    assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert not Recipient.objects.exists()


def test_a_sending_message_cannot_be_deleted(admin_client):
    message = MessageFactory(status="sending")
    url = reverse("admin:sending_message_delete", args=[message.pk])
    assert admin_client.post(url, {"post": "yes"}).status_code == 403
    assert Message.objects.filter(pk=message.pk).exists()


# Recipients ---------------------------------------------------------------------------------

RECIPIENTS = "admin:sending_recipient_changelist"


def test_recipients_cannot_be_added_in_admin(admin_client):
    assert admin_client.get(reverse("admin:sending_recipient_add")).status_code == 403


def test_system_fields_of_a_recipient_are_read_only(admin_client):
    recipient = RecipientFactory(email="ada@example.edu")
    url = reverse("admin:sending_recipient_change", args=[recipient.pk])
    response = admin_client.post(
        url,
        {
            "email": "ada.l@example.edu",
            "merge_data": '{"first_name": "Ada"}',
            "status": "sent",
            "attempts": "3",
            "provider_message_id": "forged",
            "last_error": "forged",
        },
    )
    assert response.status_code == 302
    recipient.refresh_from_db()
    assert recipient.email == "ada.l@example.edu"  # a draft's recipient may be corrected
    assert (recipient.status, recipient.attempts, recipient.provider_message_id) == (
        "queued",
        0,
        "",
    )
    assert recipient.last_error == ""


def test_a_recipient_of_a_started_message_is_read_only(admin_client):
    recipient = RecipientFactory(message=MessageFactory(status="sending"), email="a@example.edu")
    url = reverse("admin:sending_recipient_change", args=[recipient.pk])
    admin_client.post(url, {"email": "b@example.edu", "merge_data": "{}"})
    recipient.refresh_from_db()
    assert recipient.email == "a@example.edu"


def test_recipients_filter_by_message_and_status(admin_client):
    message = _with_recipients(MessageFactory(), sent=2, failed=1)
    _with_recipients(MessageFactory(), sent=5)
    response = admin_client.get(
        reverse(RECIPIENTS), {"message__id__exact": message.pk, "status__exact": "sent"}
    )
    results = list(response.context["cl"].result_list)
    assert len(results) == 2
    assert {r.message_id for r in results} == {message.pk}


def test_an_old_message_stays_selectable_in_the_message_filter(admin_client):
    old = MessageFactory(subject="Old news")
    for _ in range(25):
        MessageFactory()
    response = admin_client.get(reverse(RECIPIENTS), {"message__id__exact": old.pk})
    assert response.status_code == 200
    assert "Old news" in response.content.decode()


def test_recipients_are_found_by_exact_email_in_any_case_or_provider_id(admin_client):
    RecipientFactory(email="Ada@Example.edu", provider_message_id="0100-abc")
    RecipientFactory(email="adam@example.edu", provider_message_id="0100-def")
    for term in ("ada@example.EDU", "0100-abc"):
        response = admin_client.get(reverse(RECIPIENTS), {"q": term})
        assert [r.email for r in response.context["cl"].result_list] == ["Ada@Example.edu"]


def test_recipient_list_takes_the_same_queries_for_more_rows(admin_client):
    def queries():
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(reverse(RECIPIENTS)).status_code == 200
        return len(captured)

    _with_recipients(MessageFactory(), sent=2)
    few = queries()
    for _ in range(4):
        _with_recipients(MessageFactory(), sent=3)
    assert queries() == few


def test_recipient_list_never_counts_past_its_cap(admin_client, monkeypatch):
    monkeypatch.setattr(CappedCountPaginator, "cap", 5)
    monkeypatch.setattr(site._registry[Recipient], "list_per_page", 3)
    _with_recipients(MessageFactory(), queued=12)
    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(reverse(RECIPIENTS))
    page = response.content.decode()
    assert "More than 5 recipients" in page
    counts = [q["sql"] for q in captured if "COUNT(" in q["sql"].upper()]
    assert counts and all("LIMIT 6" in sql.upper() for sql in counts)


# Delivery log export ------------------------------------------------------------------------


def _csv(response) -> list[list[str]]:
    assert response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="delivery-log-')
    body = b"".join(response.streaming_content).decode()
    return list(csv.reader(io.StringIO(body)))


def test_export_streams_the_delivery_log_of_the_filtered_list(admin_client):
    message = MessageFactory()
    RecipientFactory(
        message=message,
        email="ada@example.edu",
        status="sent",
        attempts=1,
        provider_message_id="0100-abc",
    )
    RecipientFactory(
        message=message, email="bob@example.edu", status="failed", last_error="=HYPERLINK(1)"
    )
    RecipientFactory(message=MessageFactory(), email="other@example.edu")

    page = admin_client.get(reverse(RECIPIENTS), {"message__id__exact": message.pk})
    export_url = reverse("admin:sending_recipient_export")
    assert f"{export_url}?message__id__exact={message.pk}" in page.content.decode()

    rows = _csv(admin_client.get(export_url, {"message__id__exact": message.pk}))
    assert rows[0] == [
        "email",
        "status",
        "attempts",
        "provider_message_id",
        "sent_at",
        "last_error",
    ]
    assert [row[:4] for row in rows[1:]] == [
        ["ada@example.edu", "sent", "1", "0100-abc"],
        ["bob@example.edu", "failed", "0", ""],
    ]
    assert rows[2][5] == "'=HYPERLINK(1)"  # not a formula when opened in a spreadsheet

    rows = _csv(
        admin_client.get(export_url, {"message__id__exact": message.pk, "q": "bob@example.edu"})
    )
    assert [row[0] for row in rows[1:]] == ["bob@example.edu"]


def test_export_action_streams_the_selected_recipients(admin_client):
    chosen = RecipientFactory(email="chosen@example.edu")
    RecipientFactory(email="other@example.edu")
    response = admin_client.post(
        reverse(RECIPIENTS),
        {"action": "export_delivery_log", "_selected_action": [chosen.pk], "index": 0},
    )
    rows = _csv(response)
    assert [row[0] for row in rows[1:]] == ["chosen@example.edu"]


def test_export_needs_permission_to_view_recipients(client):
    from tests.factories import UserFactory

    client.force_login(UserFactory())  # staff, no permissions
    assert client.get(reverse("admin:sending_recipient_export")).status_code == 403


def test_a_sending_message_cannot_be_deleted_in_bulk_either(admin_client):
    running = MessageFactory(status="sending", subject="Running")
    draft = MessageFactory(subject="Draft")
    response = admin_client.post(
        reverse(CHANGELIST),
        {"action": "delete_selected", "_selected_action": [running.pk, draft.pk], "post": "yes"},
    )
    assert response.status_code == 200
    assert "Running (sending: cancel it first)" in response.content.decode()
    assert Message.objects.count() == 2
