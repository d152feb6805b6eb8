"""Provider tracking webhooks over HTTP on the real server (uvicorn): SES through SNS (with the
subscription confirmation) and Postmark, behind the basic-auth secret; bounces and complaints
become suppressions once, whatever the provider repeats; `unknown` recipients settle; a message
halts at its customer's threshold and not below."""

import json
import threading
import uuid
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest
import requests
from django.utils import timezone

from customers.models import Customer, Suppression
from sending.models import Message, Recipient, TrackingEvent
from tests.factories import make_customer

SECRET = ("provider", "webhook-secret")
POSTMARK = "/public/anymail/postmark/tracking/"
SES = "/public/anymail/amazon_ses/tracking/"
TOPIC = "arn:aws:sns:us-west-2:123456789012:ses-events"


@pytest.fixture
def hooks(asgi_server, settings):
    settings.ANYMAIL = {**settings.ANYMAIL, "WEBHOOK_SECRET": ":".join(SECRET)}
    return asgi_server.url


def sending_message(n, *, status=Recipient.Status.SENT, **customer_fields):
    customer = make_customer(f"c{uuid.uuid4().hex[:8]}")
    if customer_fields:
        Customer.objects.filter(pk=customer.pk).update(**customer_fields)
        customer.refresh_from_db()
    message = Message.objects.create(
        customer=customer,
        subject="Hello",
        text_body="Hi",
        status=Message.Status.SENDING,
        started_at=timezone.now(),
    )
    Recipient.objects.bulk_create(
        Recipient(
            message=message,
            email=f"r{i}@{customer.slug}.edu",
            status=status,
            provider_message_id=f"pm-{message.pk}-{i}",
        )
        for i in range(n)
    )
    return message, list(message.recipients.order_by("id"))


# Postmark -------------------------------------------------------------------------------------


def postmark_bounce(recipient, *, kind="HardBounce", record="Bounce", event_id=None):
    return {
        "RecordType": record,
        "ID": event_id if event_id is not None else recipient.pk * 10,
        "Type": kind,
        "TypeCode": 1,
        "MessageID": recipient.provider_message_id,
        "Metadata": {"emailops_recipient_id": str(recipient.pk)},
        "MessageStream": "outbound",
        "Description": "The server was unable to deliver your message",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist",
        "Email": recipient.email,
        "From": "news@college.example",
        "BouncedAt": "2026-12-03T16:33:54.9070259Z",
    }


def post_postmark(url, payload, auth=SECRET):
    return requests.post(url + POSTMARK, json=payload, auth=auth, timeout=10)


def test_postmark_hard_bounce_suppresses_once_however_often_it_is_posted(hooks):
    message, recipients = sending_message(3)
    target = recipients[1]

    for _ in range(3):
        answer = post_postmark(hooks, postmark_bounce(target))
        assert answer.status_code == 200, answer.text

    [event] = TrackingEvent.objects.all()
    assert (event.kind, event.recipient_id, event.message_id, event.esp) == (
        "hard_bounce",
        target.pk,
        message.pk,
        "Postmark",
    )
    [row] = Suppression.objects.all()
    assert (row.customer_id, row.email, row.reason) == (
        message.customer_id,
        target.email,
        "hard_bounce",
    )
    assert row.source.startswith("Postmark webhook")


def test_postmark_complaint_suppresses_and_a_soft_bounce_does_not(hooks):
    _, recipients = sending_message(3)

    post_postmark(
        hooks, postmark_bounce(recipients[0], kind="SpamComplaint", record="SpamComplaint")
    )
    post_postmark(hooks, postmark_bounce(recipients[2], kind="SoftBounce"))

    assert list(Suppression.objects.values_list("email", "reason")) == [
        (recipients[0].email, "complaint")
    ]
    kinds = dict(TrackingEvent.objects.values_list("recipient_id", "kind"))
    assert kinds == {recipients[0].pk: "complaint", recipients[2].pk: "other"}


@pytest.mark.parametrize("auth", [None, ("provider", "wrong"), ("someone", "webhook-secret")])
def test_a_wrong_or_missing_secret_is_refused_and_changes_nothing(hooks, auth):
    _, recipients = sending_message(1)

    answer = post_postmark(hooks, postmark_bounce(recipients[0]), auth=auth)

    assert answer.status_code in (400, 401, 403)
    assert not TrackingEvent.objects.exists()
    assert not Suppression.objects.exists()


def test_a_delivery_settles_an_unknown_recipient_as_sent_and_a_rejection_as_failed(hooks):
    _, recipients = sending_message(2, status=Recipient.Status.UNKNOWN)
    delivery = {
        "RecordType": "Delivery",
        "MessageID": recipients[0].provider_message_id,
        "Recipient": recipients[0].email,
        "Metadata": {"emailops_recipient_id": str(recipients[0].pk)},
        "DeliveredAt": "2026-12-03T16:33:54Z",
        "Details": "Test delivery webhook details",
    }
    rejected = postmark_bounce(recipients[1], kind="BadEmailAddress")

    assert post_postmark(hooks, delivery).status_code == 200
    assert post_postmark(hooks, delivery).status_code == 200  # a delivery has no ID: still once
    assert post_postmark(hooks, rejected).status_code == 200

    statuses = dict(Recipient.objects.values_list("pk", "status"))
    assert statuses == {recipients[0].pk: "sent", recipients[1].pk: "failed"}
    assert Recipient.objects.get(pk=recipients[1].pk).last_error == "Postmark reported it rejected"
    assert TrackingEvent.objects.count() == 2


# Amazon SES through SNS -----------------------------------------------------------------------


def sns(message: dict | str, *, kind="Notification", **extra):
    envelope = {
        "Type": kind,
        "MessageId": str(uuid.uuid4()),
        "TopicArn": TOPIC,
        "Message": message if isinstance(message, str) else json.dumps(message),
        "Timestamp": "2026-12-03T22:00:00.000Z",
        "SignatureVersion": "1",
        "Signature": "not-checked",
        "SigningCertURL": "https://sns.us-west-2.amazonaws.com/cert.pem",
        **extra,
    }
    return envelope


def post_sns(url, envelope, auth=SECRET):
    headers = {
        "x-amz-sns-message-type": envelope["Type"],
        "x-amz-sns-message-id": envelope["MessageId"],
        "Content-Type": "text/plain; charset=UTF-8",
    }
    return requests.post(url + SES, data=json.dumps(envelope), headers=headers, auth=auth,
                         timeout=10)  # fmt: skip


def ses_event(recipient, event_type, *, header=True, **body):
    mail = {
        "timestamp": "2026-12-03T21:59:00.000Z",
        "messageId": recipient.provider_message_id,
        "destination": [recipient.email],
        "headers": [{"name": "X-EmailOps-Idempotency-Key", "value": str(recipient.pk)}]
        if header
        else [],
    }
    return {"eventType": event_type, "mail": mail, **body}


def ses_bounce(recipient, bounce_type="Permanent", **kwargs):
    return ses_event(recipient, "Bounce", bounce={
        "bounceType": bounce_type,
        "bounceSubType": "General",
        "bouncedRecipients": [{"emailAddress": recipient.email, "diagnosticCode": "smtp; 550"}],
    }, **kwargs)  # fmt: skip


def test_ses_permanent_bounce_and_complaint_suppress_once_and_a_transient_does_not(hooks):
    _, recipients = sending_message(4)
    bounce = sns(ses_bounce(recipients[0]))
    complaint = sns(ses_event(recipients[1], "Complaint", header=False, complaint={
        "complainedRecipients": [{"emailAddress": recipients[1].email}],
        "complaintFeedbackType": "abuse",
    }))  # fmt: skip
    transient = sns(ses_bounce(recipients[2], "Transient"))

    for envelope in (bounce, bounce, complaint, transient, complaint):
        answer = post_sns(hooks, envelope)
        assert answer.status_code == 200, answer.text

    assert sorted(Suppression.objects.values_list("email", "reason")) == [
        (recipients[0].email, "hard_bounce"),
        (recipients[1].email, "complaint"),
    ]
    # The complaint named no recipient id: found by SES's message id (provider_message_id).
    assert dict(TrackingEvent.objects.values_list("recipient_id", "kind")) == {
        recipients[0].pk: "hard_bounce",
        recipients[1].pk: "complaint",
        recipients[2].pk: "other",
    }


def test_sns_asks_for_basic_auth_first_and_a_wrong_secret_is_refused(hooks):
    _, recipients = sending_message(1)
    envelope = sns(ses_bounce(recipients[0]))

    first = post_sns(hooks, envelope, auth=None)
    wrong = post_sns(hooks, envelope, auth=("provider", "nope"))

    assert first.status_code == 401
    assert first.headers["WWW-Authenticate"].startswith("Basic")
    assert wrong.status_code == 400
    assert not TrackingEvent.objects.exists() and not Suppression.objects.exists()


class FakeSns(BaseHTTPRequestHandler):
    """SNS's query API, enough for ConfirmSubscription: records what it was asked."""

    calls: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.calls.append({k: v[0] for k, v in parse_qs(body).items()})
        answer = (
            '<ConfirmSubscriptionResponse xmlns="http://sns.amazonaws.com/doc/2010-03-31/">'
            f"<ConfirmSubscriptionResult><SubscriptionArn>{TOPIC}:sub-1</SubscriptionArn>"
            "</ConfirmSubscriptionResult><ResponseMetadata><RequestId>r-1</RequestId>"
            "</ResponseMetadata></ConfirmSubscriptionResponse>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_sns(settings):
    FakeSns.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSns)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.ANYMAIL = {
        **settings.ANYMAIL,
        "AMAZON_SES_CLIENT_PARAMS": {"endpoint_url": f"http://127.0.0.1:{server.server_port}"},
        "AMAZON_SES_SESSION_PARAMS": {
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        },
    }
    yield FakeSns.calls
    server.shutdown()
    server.server_close()


def test_an_sns_subscription_confirmation_is_confirmed_through_the_sns_api(hooks, fake_sns):
    envelope = sns(
        "You have chosen to subscribe to the topic.",
        kind="SubscriptionConfirmation",
        Token="token-2336412f37",
        SubscribeURL="https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription",
    )

    answer = post_sns(hooks, envelope)

    assert answer.status_code == 200, answer.text
    [call] = fake_sns
    assert call["Action"] == "ConfirmSubscription"
    assert (call["TopicArn"], call["Token"]) == (TOPIC, "token-2336412f37")
    assert not TrackingEvent.objects.exists()


def test_a_subscription_confirmation_with_a_wrong_secret_is_not_confirmed(hooks, fake_sns):
    envelope = sns("x", kind="SubscriptionConfirmation", Token="t", SubscribeURL="https://x")
    assert post_sns(hooks, envelope, auth=("provider", "nope")).status_code == 400
    assert fake_sns == []


# Automatic halt --------------------------------------------------------------------------------


def bounce_all(url, recipients, **kwargs):
    for recipient in recipients:
        answer = post_postmark(url, postmark_bounce(recipient, **kwargs))
        assert answer.status_code == 200, answer.text


def test_a_message_halts_at_the_bounce_threshold_and_not_below(hooks):
    message, recipients = sending_message(100, halt_window=100)

    bounce_all(hooks, recipients[:4])  # 4 % of the last 100 sends
    message.refresh_from_db()
    assert (message.status, message.halt_reason) == ("sending", "")

    bounce_all(hooks, recipients[4:5])  # 5 %: the customer's default limit
    message.refresh_from_db()
    assert message.status == "paused"
    assert message.halt_reason == (
        "Halted automatically: hard-bounce rate 5.00 % (5 of the last 100 sends) reached the "
        "customer's limit of 5.00 %."
    )


def test_a_message_halts_at_the_complaint_threshold_and_not_below(hooks):
    message, recipients = sending_message(1000)
    assert message.customer.halt_complaint_percent == Decimal("0.30")

    bounce_all(hooks, recipients[:2], kind="SpamComplaint", record="SpamComplaint")  # 0.2 %
    message.refresh_from_db()
    assert message.status == "sending"

    bounce_all(hooks, recipients[2:3], kind="SpamComplaint", record="SpamComplaint")  # 0.3 %
    message.refresh_from_db()
    assert message.status == "paused"
    assert "complaint rate 0.30 % (3 of the last 1000 sends)" in message.halt_reason


def test_only_the_last_sends_count_and_a_small_send_is_not_judged(hooks):
    message, recipients = sending_message(200, halt_window=100)
    # Five bounces among the first 100 sends: outside the window of the last 100.
    bounce_all(hooks, recipients[:5])
    message.refresh_from_db()
    assert message.status == "sending"

    small, few = sending_message(99)
    bounce_all(hooks, few[:50])  # half of 99 sends: too few sends to judge
    small.refresh_from_db()
    assert small.status == "sending"
