"""sending.providers against real servers: aiosmtpd, moto's SES v2, the sandbox (Postmark API)."""

import email
import email.policy
import threading
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from aiosmtpd.controller import Controller
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ses.models import ses_backends

from sending.providers import (
    IDEMPOTENCY_HEADER,
    SendError,
    Throttled,
    open_provider,
    ses_error,
    smtp_error,
)
from sending.sandbox import Latency, SandboxServer
from tests.net import free_port

SENDER = "news@college.example"


def email_fields(recipient_id=1, to="ada@example.com", **overrides):
    fields = {
        "recipient_id": recipient_id,
        "to": to,
        "subject": "Welcome, Ada",
        "text": "Hello Ada",
        "html": "<p>Hello <b>Ada</b></p>",
        "from_email": SENDER,
        "reply_to": "office@college.example",
    }
    return {**fields, **overrides}


# SMTP ---------------------------------------------------------------------------------------


class RecordingHandler:
    """Keeps every message it is given, with the client's address (one per connection)."""

    def __init__(self):
        self.messages = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append((session.peer, envelope))
        return "250 OK"


class RefusingHandler:
    """Answers RCPT for local part `codeNNN` with reply NNN; accepts everyone else."""

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("code"):
            code = local[4:]
            return f"{code} {'4' if code[0] == '4' else '5'}.7.1 refused by test ({code})"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


@pytest.fixture
def smtp_server():
    def start(handler):
        controller = Controller(handler, hostname="127.0.0.1", port=free_port())
        controller.start()
        servers.append(controller)
        return controller

    servers = []
    yield start
    for controller in servers:
        controller.stop()


def smtp_provider(controller):
    return open_provider(
        {
            "kind": "smtp",
            "settings": {"host": controller.hostname, "port": controller.port, "timeout": 5},
            "credentials": {},
            "per_minute_cap": 100,
        }
    )


def test_smtp_delivers_text_and_html_with_headers_and_returns_message_id(smtp_server):
    handler = RecordingHandler()
    provider = smtp_provider(smtp_server(handler))
    try:
        message_id = provider.send(**email_fields(recipient_id=42))
    finally:
        provider.close()

    assert len(handler.messages) == 1
    _, envelope = handler.messages[0]
    assert envelope.mail_from == SENDER
    assert envelope.rcpt_tos == ["ada@example.com"]
    received = email.message_from_bytes(envelope.content, policy=email.policy.default)
    assert received["Message-ID"] == message_id
    assert message_id.endswith("@college.example>")
    assert received[IDEMPOTENCY_HEADER] == "42"
    assert received["Reply-To"] == "office@college.example"
    assert received["Subject"] == "Welcome, Ada"
    assert received.get_content_type() == "multipart/alternative"
    assert received.get_body(("plain",)).get_content().strip() == "Hello Ada"
    assert received.get_body(("html",)).get_content().strip() == "<p>Hello <b>Ada</b></p>"


def test_smtp_text_only_message_is_plain(smtp_server):
    handler = RecordingHandler()
    provider = smtp_provider(smtp_server(handler))
    try:
        provider.send(**email_fields(html="", reply_to=""))
    finally:
        provider.close()

    received = email.message_from_bytes(handler.messages[0][1].content)
    assert received.get_content_type() == "text/plain"
    assert received["Reply-To"] is None


def test_smtp_reuses_one_connection_across_sends(smtp_server):
    handler = RecordingHandler()
    provider = smtp_provider(smtp_server(handler))
    try:
        ids = [provider.send(**email_fields(recipient_id=i)) for i in range(1, 6)]
    finally:
        provider.close()

    assert len(handler.messages) == 5
    assert len(set(ids)) == 5
    assert len({peer for peer, _ in handler.messages}) == 1


def test_smtp_sends_from_many_threads_all_arrive(smtp_server):
    handler = RecordingHandler()
    provider = smtp_provider(smtp_server(handler))
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = list(
                pool.map(
                    lambda i: provider.send(**email_fields(recipient_id=i, to=f"r{i}@example.com")),
                    range(1, 17),
                )
            )
    finally:
        provider.close()

    assert len(set(ids)) == 16
    received = sorted(envelope.rcpt_tos[0] for _, envelope in handler.messages)
    assert received == sorted(f"r{i}@example.com" for i in range(1, 17))
    # One connection per sending thread, each reused.
    assert len({peer for peer, _ in handler.messages}) <= 8


@pytest.mark.parametrize(
    ("code", "error_class", "permanent"),
    [
        (421, Throttled, False),
        (451, Throttled, False),
        (454, Throttled, False),
        (452, SendError, False),
        (450, SendError, False),
        (550, SendError, True),
        (553, SendError, True),
    ],
)
def test_smtp_refusals_map_to_throttled_temporary_or_permanent(
    smtp_server, code, error_class, permanent
):
    provider = smtp_provider(smtp_server(RefusingHandler()))
    try:
        with pytest.raises(SendError) as caught:
            provider.send(**email_fields(to=f"code{code}@example.com"))
        # After a refusal the provider still sends (a new connection if the server closed it).
        assert provider.send(**email_fields(to="ok@example.com"))
    finally:
        provider.close()

    assert type(caught.value) is error_class
    assert caught.value.permanent is permanent
    assert caught.value.code == code
    assert f"refused by test ({code})" in caught.value.message


def test_smtp_connection_refused_is_temporary():
    provider = open_provider(
        {
            "kind": "smtp",
            "settings": {"host": "127.0.0.1", "port": free_port(), "timeout": 2},
            "credentials": {},
            "per_minute_cap": 100,
        }
    )
    with pytest.raises(SendError) as caught:
        provider.send(**email_fields())
    assert type(caught.value) is SendError
    assert caught.value.permanent is False
    assert caught.value.maybe_sent is False


def test_smtp_error_mapping_of_a_greeting_refusal():
    import smtplib

    error = smtp_error(smtplib.SMTPConnectError(421, b"too many connections"))
    assert isinstance(error, Throttled)
    assert error.message == "421 too many connections"
    assert smtp_error(ValueError("not ours")) is None


# Amazon SES v2 ------------------------------------------------------------------------------

SES_CONFIG = {
    "kind": "amazon_ses",
    "settings": {"region": "us-east-1"},
    "credentials": {"access_key_id": "AKIDTEST", "secret_access_key": "secret"},
    "per_minute_cap": 14,
}


@pytest.fixture
def aws(monkeypatch):
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    with mock_aws():
        yield


def test_ses_send_returns_message_id_that_moto_recorded(aws):
    ses = boto3.client(
        "sesv2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    ses.create_email_identity(EmailIdentity=SENDER)
    provider = open_provider(SES_CONFIG)
    try:
        message_id = provider.send(**email_fields(recipient_id=9))
    finally:
        provider.close()

    sent = ses_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].sent_messages
    assert [m.id for m in sent] == [message_id]
    raw = email.message_from_string(sent[0].raw_data)
    assert raw[IDEMPOTENCY_HEADER] == "9"
    assert raw.get_content_type() == "multipart/alternative"


def test_ses_unverified_sender_is_a_permanent_error(aws):
    provider = open_provider(SES_CONFIG)
    try:
        with pytest.raises(SendError) as caught:
            provider.send(**email_fields(from_email="someone@unverified.example"))
    finally:
        provider.close()
    assert type(caught.value) is SendError
    assert caught.value.permanent is True
    assert caught.value.code == "MessageRejected"


class _Body:
    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **kwargs):
        yield self.data


def test_ses_client_makes_one_attempt_and_a_throttled_answer_raises_throttled():
    """SES takes no idempotency token, so botocore must not retry a send by itself."""
    provider = open_provider(SES_CONFIG)
    client = provider.backend().client
    assert client.meta.config.retries["total_max_attempts"] == 1
    attempts = []

    def answer_too_many(request, **kwargs):
        attempts.append(request.url)
        body = b'{"message": "Maximum sending rate exceeded."}'
        headers = {
            "x-amzn-ErrorType": "TooManyRequestsException",
            "Content-Type": "application/json",
        }
        return AWSResponse(request.url, 429, headers, _Body(body))

    # Answers every HTTP attempt in place of AWS: nothing leaves this process.
    client.meta.events.register("before-send.sesv2.SendEmail", answer_too_many)
    try:
        with pytest.raises(Throttled) as caught:
            provider.send(**email_fields())
    finally:
        provider.close()

    assert len(attempts) == 1
    assert caught.value.code == "TooManyRequestsException"
    assert "Maximum sending rate exceeded" in caught.value.message


@pytest.mark.parametrize(
    ("code", "message", "status", "expected", "permanent"),
    [
        ("TooManyRequestsException", "Too many requests", 429, Throttled, False),
        ("Throttling", "Maximum sending rate exceeded.", 400, Throttled, False),
        ("LimitExceededException", "Daily message quota exceeded.", 400, SendError, False),
        ("MessageRejected", "Email address is not verified.", 400, SendError, True),
        ("InternalFailure", "oops", 500, SendError, False),
    ],
)
def test_ses_error_mapping(code, message, status, expected, permanent):
    error = ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "SendEmail",
    )
    mapped = ses_error(error)
    assert type(mapped) is expected
    assert mapped.permanent is permanent
    assert message in mapped.message


# Postmark API (the sandbox) -----------------------------------------------------------------


@pytest.fixture
def sandbox():
    server = SandboxServer(caps={"key-a": 3, "key-b": 1000}).start()
    yield server
    server.stop()


def sandbox_provider(server, key="key-a", kind="sandbox"):
    credentials = {"api_key": key} if kind == "sandbox" else {"server_token": key}
    return open_provider(
        {
            "kind": kind,
            "settings": {"api_url": server.url},
            "credentials": credentials,
            "per_minute_cap": 3,
        }
    )


@pytest.mark.parametrize("kind", ["sandbox", "postmark"])
def test_postmark_send_returns_the_message_id_the_sandbox_recorded(sandbox, kind):
    provider = sandbox_provider(sandbox, kind=kind)
    try:
        message_id = provider.send(**email_fields(recipient_id=77))
    finally:
        provider.close()

    [send] = sandbox.sends
    assert send.message_id == message_id
    assert send.api_key == "key-a"
    assert send.to == "ada@example.com"
    assert send.subject == "Welcome, Ada"
    assert send.idempotency_key == "77"
    assert abs(send.arrived_ms - sandbox.ledger.now_ms()) < 5_000


def test_postmark_repeated_recipient_is_a_duplicate_at_the_provider(sandbox):
    provider = sandbox_provider(sandbox, key="key-b")
    try:
        provider.send(**email_fields(recipient_id=5))
        provider.send(**email_fields(recipient_id=6))
        provider.send(**email_fields(recipient_id=5))
    finally:
        provider.close()

    report = sandbox.report()
    assert report["total"] == {"key-b": 2}
    assert report["duplicates"] == {"key-b": 1}


def test_postmark_past_the_cap_raises_throttled_and_nothing_is_recorded():
    # 20 s into a calendar minute on the sandbox's clock, so every send falls in that minute.
    sandbox = SandboxServer(caps={"key-a": 3}, clock=lambda: 1_800_000_020_000).start()
    provider = sandbox_provider(sandbox)
    try:
        for recipient_id in (1, 2, 3):
            provider.send(**email_fields(recipient_id=recipient_id))
        with pytest.raises(Throttled) as caught:
            provider.send(**email_fields(recipient_id=4))
    finally:
        provider.close()
        sandbox.stop()

    assert caught.value.code == 429
    assert caught.value.retry_after == 40
    assert [s.idempotency_key for s in sandbox.sends] == ["1", "2", "3"]
    assert sandbox.report()["per_minute"] == {"key-a": {"2027-01-15T08:00": 3}}


def test_postmark_unknown_token_is_a_permanent_error(sandbox):
    provider = sandbox_provider(sandbox, key="nobody")
    try:
        with pytest.raises(SendError) as caught:
            provider.send(**email_fields())
    finally:
        provider.close()
    assert type(caught.value) is SendError
    assert caught.value.permanent is True
    assert caught.value.code == 401
    assert "ErrorCode 10" in caught.value.message
    assert sandbox.sends == []


def test_postmark_server_error_is_temporary_and_the_next_send_goes(sandbox):
    sandbox.inject_fault(500, count=1)
    provider = sandbox_provider(sandbox)
    try:
        with pytest.raises(SendError) as caught:
            provider.send(**email_fields(recipient_id=1))
        provider.send(**email_fields(recipient_id=1))
    finally:
        provider.close()
    assert type(caught.value) is SendError
    assert caught.value.permanent is False
    assert caught.value.code == 500
    assert [s.idempotency_key for s in sandbox.sends] == ["1"]


@pytest.mark.parametrize("kind", ["sandbox", "smtp", "amazon_ses"])
@pytest.mark.parametrize("to", ["", "not-an-address", "a@b@c.example"])
def test_an_invalid_address_is_a_permanent_error_before_any_call(kind, to):
    # Nothing listens on these: the address is refused before any connection is made.
    port = free_port()
    settings = {"api_url": f"http://127.0.0.1:{port}/", "host": "127.0.0.1", "port": port}
    config = {**SES_CONFIG, "kind": kind, "settings": {**settings, "region": "us-east-1"}}
    provider = open_provider(config)
    with pytest.raises(SendError) as caught:
        provider.send(**email_fields(to=to))
    assert type(caught.value) is SendError
    assert caught.value.permanent is True


def test_postmark_unreachable_is_temporary():
    provider = open_provider(
        {
            "kind": "sandbox",
            "settings": {"api_url": f"http://127.0.0.1:{free_port()}/"},
            "credentials": {"api_key": "k"},
            "per_minute_cap": 1,
        }
    )
    with pytest.raises(SendError) as caught:
        provider.send(**email_fields())
    assert caught.value.permanent is False
    assert caught.value.maybe_sent is False


def test_postmark_timeout_after_the_request_left_may_have_sent():
    """The sandbox took the message but answered too late: the worker must not re-send it."""
    with SandboxServer(caps={"k": 10}, latency=Latency(median_ms=400, p99_ms=400)) as sandbox:
        config = {"kind": "sandbox", "settings": {"api_url": sandbox.url}, "credentials": {}}
        provider = open_provider({**config, "credentials": {"api_key": "k"}}, timeout=0.1)
        try:
            with pytest.raises(SendError) as caught:
                provider.send(**email_fields(recipient_id=3))
        finally:
            provider.close()
        sends = sandbox.sends

    assert caught.value.permanent is False
    assert caught.value.maybe_sent is True
    assert [s.idempotency_key for s in sends] == ["3"]


def test_postmark_sends_from_many_threads_reuse_connections(sandbox):
    provider = sandbox_provider(sandbox, key="key-b")
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = list(pool.map(lambda i: provider.send(**email_fields(recipient_id=i)), range(40)))
    finally:
        provider.close()
    assert len(set(ids)) == 40
    assert sorted(int(s.idempotency_key) for s in sandbox.sends) == list(range(40))
    assert sandbox.connections_opened <= 8


def test_open_provider_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown provider kind 'fax'"):
        open_provider({"kind": "fax", "settings": {}, "credentials": {}, "per_minute_cap": 1})


# One-click unsubscribe headers (RFC 8058) reach every provider ---------------------------

ONE_CLICK = "List-Unsubscribe=One-Click"


def test_smtp_delivers_the_unsubscribe_headers(smtp_server):
    recording = RecordingHandler()
    provider = smtp_provider(smtp_server(recording))
    url = "https://mail.example/public/unsubscribe/abc:def/"
    try:
        provider.send(
            **email_fields(), unsubscribe_url=url, unsubscribe_mailto="leave@college.example"
        )
    finally:
        provider.close()

    [(_, envelope)] = recording.messages
    received = email.message_from_bytes(envelope.content, policy=email.policy.default)
    assert received["List-Unsubscribe"] == (
        f"<{url}>, <mailto:leave@college.example?subject=unsubscribe>"
    )
    assert received["List-Unsubscribe-Post"] == ONE_CLICK


def test_ses_delivers_the_unsubscribe_headers(aws):
    ses = boto3.client(
        "sesv2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    ses.create_email_identity(EmailIdentity=SENDER)
    url = "https://mail.example/public/unsubscribe/abc:def/"
    provider = open_provider(SES_CONFIG)
    try:
        provider.send(**email_fields(), unsubscribe_url=url)
    finally:
        provider.close()

    [sent] = ses_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].sent_messages
    raw = email.message_from_string(sent.raw_data)
    assert raw["List-Unsubscribe"] == f"<{url}>"
    assert raw["List-Unsubscribe-Post"] == ONE_CLICK
