import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from sending.models import Message, Recipient
from tests.factories import MessageFactory, RecipientFactory

pytestmark = pytest.mark.django_db


def test_a_recipient_appears_once_per_message_whatever_the_case():
    recipient = RecipientFactory(email="ada@example.edu")
    with pytest.raises(IntegrityError), transaction.atomic():
        Recipient.objects.create(message=recipient.message, email="ADA@Example.edu")
    RecipientFactory(email="ADA@Example.edu")  # another message may have them


def test_a_message_without_a_body_is_refused_by_the_database():
    with pytest.raises(IntegrityError), transaction.atomic():
        MessageFactory(text_body="", html_body="")


def test_a_scheduled_message_without_a_time_is_refused_by_the_database():
    with pytest.raises(IntegrityError), transaction.atomic():
        MessageFactory(status=Message.Status.SCHEDULED, scheduled_at=None)


def test_validation_explains_a_missing_body_and_a_missing_time():
    message = MessageFactory.build(text_body="", html_body="")
    with pytest.raises(ValidationError, match="needs a text body, an HTML body, or both"):
        message.clean()
    message = MessageFactory.build(status=Message.Status.SCHEDULED)
    with pytest.raises(ValidationError) as caught:
        message.clean()
    assert "scheduled_at" in caught.value.message_dict


def test_a_template_syntax_error_is_reported_on_its_field_with_its_line():
    message = MessageFactory.build(html_body="<p>Hello</p>\n<p>{% if %}</p>\n")
    with pytest.raises(ValidationError) as caught:
        message.full_clean(exclude=["customer"])
    errors = caught.value.message_dict
    assert list(errors) == ["html_body"]
    assert "line 2" in errors["html_body"][0]


def test_a_missing_merge_field_renders_empty():
    message = MessageFactory.build(
        subject="Hi {{ first_name }}", text_body="Dear {{ first_name }}{{ nickname }}."
    )
    subject, text, _ = message.compiled().render({})
    assert subject == "Hi"
    assert text == "Dear ."


def test_html_is_autoescaped_and_text_is_not():
    message = MessageFactory.build(
        subject="For {{ name }}", text_body="Hi {{ name }}", html_body="<p>Hi {{ name }}</p>"
    )
    subject, text, html = message.compiled().render({"name": "<Tom & Jerry>"})
    assert subject == "For <Tom & Jerry>"
    assert text == "Hi <Tom & Jerry>"
    assert html == "<p>Hi &lt;Tom &amp; Jerry&gt;</p>"


def test_content_is_frozen_once_a_send_starts():
    assert not MessageFactory.build(status=Message.Status.DRAFT).is_content_frozen
    assert not MessageFactory.build(status=Message.Status.SCHEDULED).is_content_frozen
    for status in ("sending", "paused", "completed", "cancelled"):
        assert MessageFactory.build(status=status).is_content_frozen
