"""How mail leaves: one small interface over Django email backends (SMTP, anymail SES, Postmark).

The worker handler opens a provider from the batch's `provider` dict, calls `send` once per
recipient (from up to `concurrency` threads at once) and closes it at the end of the batch. It has
no database and may run with minimal Django settings, so every backend option is passed explicitly
and nothing is built or read at import time.

Errors come back as two exceptions the worker can act on without knowing the provider:
`Throttled` (the provider said "too many": back off, the recipient goes back to the queue) and
`SendError` with `permanent` (retrying this recipient cannot help) or not.
"""

from __future__ import annotations

import contextlib
import os
import smtplib
import threading
from email.utils import make_msgid, parseaddr
from typing import Any

IDEMPOTENCY_HEADER = "X-EmailOps-Idempotency-Key"
IDEMPOTENCY_METADATA = "emailops_recipient_id"
DEFAULT_TIMEOUT_S = 5.0  # matches SEND_TIMEOUT_MS: nothing may arrive later than this after a start
SANDBOX_API_URL = "http://127.0.0.1:8025/"
SANDBOX_API_KEY = "sandbox"
# The largest `concurrency` a batch asks for: the SES client is shared by all send threads.
MAX_CONCURRENCY = 64

SMTP_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
SES_BACKEND = "anymail.backends.amazon_ses.EmailBackend"  # anymail's SES v2 backend
POSTMARK_BACKEND = "anymail.backends.postmark.EmailBackend"

# SMTP replies that mean "too many, slow down" rather than "this message is wrong".
# 421: service closing (also rate limits); 451: local error / rate limited ("4.7.1");
# 454: SES SMTP's "Throttling failure: Maximum sending rate exceeded". 452 is left out: it
# means full storage or too many recipients, and backing off the whole customer would not help.
SMTP_THROTTLE_CODES = frozenset({421, 451, 454})
# SES v2 error codes for "too many"; the daily quota (LimitExceededException) is not a rate.
SES_THROTTLE_CODES = frozenset({"TooManyRequestsException", "Throttling", "ThrottlingException"})
SES_THROTTLE_TEXT = "maximum sending rate exceeded"
# SES v2 error codes about the account rather than the message: the recipient may be retried.
SES_ACCOUNT_CODES = frozenset(
    {
        "LimitExceededException",
        "AccountSuspendedException",
        "SendingPausedException",
        "MailFromDomainNotVerifiedException",
        "InternalFailure",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
    }
)
# Postmark ErrorCodes (HTTP 422) about the account, not the message: a later retry can succeed.
# 405: not allowed to send (out of credits); 412/413: account pending approval.
POSTMARK_TEMPORARY_CODES = frozenset({405, 412, 413})


class SendError(Exception):
    """The provider did not take the message. `message` is the provider's own error text."""

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        code: str | int | None = None,
        maybe_sent: bool = False,
    ):
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.code = code  # the provider's code: SMTP reply code, HTTP status or SES error code
        # The request may have reached the provider before the failure (a read timeout, a
        # connection lost mid-call): re-sending could deliver the message twice.
        self.maybe_sent = maybe_sent

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.message!r}, permanent={self.permanent}, "
            f"maybe_sent={self.maybe_sent})"
        )


class Throttled(SendError):
    """The provider said "too many" (HTTP 429, SES TooManyRequestsException, SMTP 421/451/454)."""

    def __init__(self, message: str, *, code: str | int | None = None, retry_after=None):
        super().__init__(message, permanent=False, code=code)
        self.retry_after: float | None = retry_after  # seconds, when the provider said


def open_provider(config: dict, *, timeout: float | None = None) -> Provider:
    """A provider for one batch: `config` is the batch's `provider` dict (kind, settings, ...).

    Nothing connects until the first send. `timeout` (seconds) bounds each provider call; it
    defaults to the account's `settings["timeout"]`, then to DEFAULT_TIMEOUT_S.
    """
    kind = config.get("kind")
    classes = {
        "smtp": SmtpProvider,
        "amazon_ses": AmazonSesProvider,
        "postmark": PostmarkProvider,
        "sandbox": SandboxProvider,
    }
    if kind not in classes:
        raise ValueError(f"unknown provider kind {kind!r}: expected one of {', '.join(classes)}")
    _ensure_django_settings()
    settings = dict(config.get("settings") or {})
    credentials = dict(config.get("credentials") or {})
    if timeout is None:
        timeout = float(settings.get("timeout", DEFAULT_TIMEOUT_S))
    return classes[kind](settings=settings, credentials=credentials, timeout=timeout)


def check_address(to: str) -> None:
    """Refuse an address no provider could deliver to, before any connection is made."""
    from django.core.exceptions import ValidationError
    from django.core.validators import validate_email

    try:
        validate_email(parseaddr(to)[1] if "<" in to else to)
    except ValidationError:
        raise SendError(f"invalid recipient address {to!r}", permanent=True) from None


def _ensure_django_settings() -> None:
    """Email messages read a few Django settings (charset); a bare worker gets the defaults."""
    from django.conf import settings

    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        settings.configure()


class Provider:
    """Sends one recipient's email at a time; safe to call from several threads at once."""

    kind = ""
    backend_path = ""
    # One backend per thread (an SMTP connection or a requests session is not thread-safe).
    shared_backend = False

    def __init__(self, *, settings: dict, credentials: dict, timeout: float):
        self.settings = settings
        self.credentials = credentials
        self.timeout = timeout
        self._lock = threading.RLock()
        self._local = threading.local()
        self._shared: Any = None
        self._opened: list[Any] = []

    def __repr__(self):
        return f"<{type(self).__name__} {self.kind}>"

    def send(
        self,
        *,
        recipient_id: int,
        to: str,
        subject: str,
        text: str,
        html: str,
        from_email: str,
        reply_to: str,
    ) -> str:
        """Hand one email to the provider and return the provider's message id."""
        check_address(to)
        message = self.build_message(
            recipient_id=recipient_id,
            to=to,
            subject=subject,
            text=text,
            html=html,
            from_email=from_email,
            reply_to=reply_to,
        )
        backend = None
        try:
            backend = self.backend()  # opens a connection on first use
            sent = backend.send_messages([message])
        except Exception as exc:
            error = self.map_error(exc)
            if error is None:
                raise
            if backend is None:
                error.maybe_sent = False  # failed while connecting: nothing went out
            else:
                self.discard(backend, exc)
            raise error from exc
        if sent != 1:
            raise SendError("the backend sent nothing (no valid recipient)", permanent=True)
        return self.message_id(message)

    def close(self) -> None:
        """Close every connection this provider opened, in any thread."""
        with self._lock:
            opened, self._opened = self._opened, []
            self._shared = None
            self._local = threading.local()
        for backend in opened:
            # The batch's sends are done and their outcomes known; a failed goodbye (QUIT to a
            # server that already left) changes none of them.
            with contextlib.suppress(OSError):
                backend.close()

    # Building blocks for the kinds.

    def build_message(self, *, recipient_id, to, subject, text, html, from_email, reply_to):
        from django.core.mail import EmailMultiAlternatives

        message = EmailMultiAlternatives(
            subject=subject,
            body=text,
            from_email=from_email,
            to=[to],
            reply_to=[reply_to] if reply_to else None,
            headers={IDEMPOTENCY_HEADER: str(recipient_id)},
        )
        if html:
            message.attach_alternative(html, "text/html")
        return message

    def backend_kwargs(self) -> dict:
        raise NotImplementedError

    def backend(self):
        """This thread's open backend (or the shared one), built on first use."""
        if self.shared_backend:
            backend = self._shared
            if backend is None:
                with self._lock:
                    if self._shared is None:
                        self._shared = self._open_backend()
                    backend = self._shared
            return backend
        backend = getattr(self._local, "backend", None)
        if backend is None:
            backend = self._local.backend = self._open_backend()
        return backend

    def _open_backend(self):
        from django.core.mail import get_connection

        backend = get_connection(self.backend_path, fail_silently=False, **self.backend_kwargs())
        # Opened here, so send_messages reuses the connection: a backend closes what it opened
        # itself after each call.
        backend.open()
        with self._lock:
            self._opened.append(backend)
        return backend

    def discard(self, backend, exc: Exception) -> None:
        """After an error: drop the backend if its connection may be broken."""

    def map_error(self, exc: Exception) -> SendError | None:
        raise NotImplementedError

    def message_id(self, message) -> str:
        return str(message.anymail_status.message_id)


class SmtpProvider(Provider):
    """Django's SMTP backend; one connection per sending thread, kept open across the batch."""

    kind = "smtp"
    backend_path = SMTP_BACKEND

    def backend_kwargs(self) -> dict:
        s, c = self.settings, self.credentials
        return {
            "host": s.get("host", "localhost"),
            "port": int(s.get("port", 25)),
            "use_tls": bool(s.get("use_tls", False)),
            "use_ssl": bool(s.get("use_ssl", False)),
            "timeout": self.timeout,
            "username": c.get("username", ""),
            "password": c.get("password", ""),
            "ssl_keyfile": None,
            "ssl_certfile": None,
        }

    def build_message(self, **fields):
        message = super().build_message(**fields)
        # Our own Message-ID is the only id an SMTP server gives back to us.
        domain = fields["from_email"].rpartition("@")[2].strip(" >") or "emailops.invalid"
        message.extra_headers["Message-ID"] = make_msgid(domain=domain)
        return message

    def message_id(self, message) -> str:
        return message.extra_headers["Message-ID"]

    def discard(self, backend, exc: Exception) -> None:
        code = _smtp_code(exc)
        if code is not None and code not in (-1, 421):
            # smtplib resets the transaction after a refusal; the connection is still good.
            return
        self._local.backend = None
        with self._lock:
            if backend in self._opened:
                self._opened.remove(backend)
        # The send already failed and that error is raised; a second one from tearing down the
        # broken connection adds nothing.
        with contextlib.suppress(smtplib.SMTPException, OSError):
            backend.close()

    def map_error(self, exc: Exception) -> SendError | None:
        return smtp_error(exc)


def _smtp_reply_of(exc: Exception) -> tuple[int, bytes | str] | None:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        # One recipient a message: that recipient's reply.
        return next(iter(exc.recipients.values()), (550, b"recipient refused"))
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code, exc.smtp_error
    return None


def _smtp_code(exc: Exception) -> int | None:
    reply = _smtp_reply_of(exc)
    return None if reply is None else reply[0]


def smtp_error(exc: Exception) -> SendError | None:
    """Map an smtplib/socket error to SendError/Throttled (None: not a sending error)."""
    reply = _smtp_reply_of(exc)
    if reply is not None:
        return _smtp_reply(*reply)
    if isinstance(exc, smtplib.SMTPServerDisconnected | OSError):
        # Lost mid-conversation: the server may have queued the message before it went away.
        return SendError(f"SMTP connection failed: {exc}", permanent=False, maybe_sent=True)
    if isinstance(exc, smtplib.SMTPException):
        return SendError(f"SMTP error: {exc}", permanent=False)
    return None


def _smtp_reply(code: int, text: bytes | str) -> SendError:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    message = f"{code} {text}".strip()
    if code in SMTP_THROTTLE_CODES:
        return Throttled(message, code=code)
    return SendError(message, permanent=500 <= code < 600, code=code)


class AmazonSesProvider(Provider):
    """anymail's Amazon SES v2 backend; one boto3 client (thread-safe) shared by all threads."""

    kind = "amazon_ses"
    backend_path = SES_BACKEND
    shared_backend = True

    def backend_kwargs(self) -> dict:
        from botocore.config import Config

        s, c = self.settings, self.credentials
        session_params = {}
        if c.get("access_key_id"):
            session_params = {
                "aws_access_key_id": c["access_key_id"],
                "aws_secret_access_key": c.get("secret_access_key", ""),
            }
            if c.get("session_token"):
                session_params["aws_session_token"] = c["session_token"]
        client_params: dict[str, Any] = {
            # SES takes no idempotency token: a retried send can arrive twice, or in the next
            # minute. One attempt; the worker reports failures and the queue decides.
            "config": Config(
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
                max_pool_connections=MAX_CONCURRENCY,
            ),
        }
        if s.get("region"):
            client_params["region_name"] = s["region"]
        if s.get("endpoint_url"):
            client_params["endpoint_url"] = s["endpoint_url"]
        kwargs = {
            "session_params": session_params,
            "client_params": client_params,
            "configuration_set_name": s.get("configuration_set_name"),
            "message_tag_name": None,
        }
        return {**kwargs, **_anymail_defaults()}

    def build_message(self, **fields):
        message = super().build_message(**fields)
        # Set here so Django does not look up this host's FQDN; SES replaces it with its own.
        domain = fields["from_email"].rpartition("@")[2].strip(" >") or "emailops.invalid"
        message.extra_headers["Message-ID"] = make_msgid(domain=domain)
        return message

    def map_error(self, exc: Exception) -> SendError | None:
        from anymail.exceptions import AnymailError
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, BotoCoreError | ClientError):  # raised building the client
            return SendError(f"SES client: {exc}", permanent=False)
        if not isinstance(exc, AnymailError):
            return None
        return _refused_locally(exc) or ses_error(
            exc.__cause__ if exc.__cause__ is not None else exc
        )


def ses_error(exc: BaseException) -> SendError:
    """Map a botocore error (ClientError, connection errors) to SendError/Throttled."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        # Connection failures and timeouts: nothing says the message was refused, and unless
        # the connection was never made, SES may have taken it.
        not_sent = isinstance(exc, ConnectTimeoutError | EndpointConnectionError)
        return SendError(f"SES call failed: {exc}", permanent=False, maybe_sent=not not_sent)
    error = response.get("Error", {})
    code = error.get("Code", "")
    text = error.get("Message", "") or str(exc)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    message = f"{code}: {text}" if code else text
    if code in SES_THROTTLE_CODES or status == 429 or SES_THROTTLE_TEXT in text.lower():
        return Throttled(message, code=code)
    if code in SES_ACCOUNT_CODES or status >= 500:
        return SendError(message, permanent=False, code=code)
    # MessageRejected, BadRequestException, NotFoundException...: this message will not go.
    return SendError(message, permanent=True, code=code)


class PostmarkProvider(Provider):
    """anymail's Postmark backend; one requests session (keep-alive) per sending thread."""

    kind = "postmark"
    backend_path = POSTMARK_BACKEND
    default_api_url = "https://api.postmarkapp.com/"

    def server_token(self) -> str:
        return self.credentials.get("server_token") or self.credentials.get("api_key", "")

    def backend_kwargs(self) -> dict:
        kwargs = {
            "server_token": self.server_token(),
            "api_url": self.settings.get("api_url") or self.default_api_url,
            "message_stream": self.settings.get("message_stream"),
            "use_bulk_api": False,
            "generate_message_id": False,
            "timeout": self.timeout,
        }
        return {**kwargs, **_anymail_defaults()}

    def build_message(self, **fields):
        message = super().build_message(**fields)
        message.metadata = {IDEMPOTENCY_METADATA: str(fields["recipient_id"])}
        return message

    def map_error(self, exc: Exception) -> SendError | None:
        from anymail.exceptions import AnymailError

        if not isinstance(exc, AnymailError):
            return None
        return _refused_locally(exc) or postmark_error(exc)


def postmark_error(exc) -> SendError:
    """Map an anymail Postmark error (HTTP status + Postmark ErrorCode) to SendError/Throttled."""
    from anymail.exceptions import AnymailRecipientsRefused

    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(exc, AnymailRecipientsRefused):
        # ErrorCode 406 (inactive recipient: hard bounce or complaint) or 300 (invalid To).
        return SendError(_postmark_text(exc, response), permanent=True, code=status)
    if response is None:
        # No answer at all: connection refused, reset or timed out.
        return SendError(
            f"Postmark call failed: {exc.describe_cause() or exc}",
            permanent=False,
            maybe_sent=_request_maybe_sent(exc.__cause__),
        )
    text = _postmark_text(exc, response)
    if status == 429:
        return Throttled(text, code=status, retry_after=_retry_after(response))
    if status >= 500:
        return SendError(text, permanent=False, code=status)
    error_code = _postmark_error_code(response)
    if error_code in POSTMARK_TEMPORARY_CODES:
        return SendError(text, permanent=False, code=status)
    # 401 (bad server token), 422 with 300 (invalid request), 400/401 (sender signature), ...
    return SendError(text, permanent=True, code=status)


def _request_maybe_sent(cause) -> bool:
    """Whether a failed HTTP call may still have delivered its request."""
    import requests
    from urllib3.exceptions import NewConnectionError

    if isinstance(cause, requests.ConnectTimeout):
        return False
    if isinstance(cause, requests.ConnectionError):
        reason = getattr(cause.args[0], "reason", None) if cause.args else None
        return not isinstance(reason, NewConnectionError)  # refused: never connected
    return isinstance(cause, requests.Timeout)


def _postmark_error_code(response) -> int | None:
    try:
        return int(response.json().get("ErrorCode"))
    except (ValueError, TypeError, AttributeError):
        return None


def _postmark_text(exc, response) -> str:
    if response is None:
        return str(exc.args[0]) if exc.args else str(exc)
    try:
        body = response.json()
        return f"HTTP {response.status_code}, ErrorCode {body['ErrorCode']}: {body['Message']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"


def _retry_after(response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError, TypeError):
        return None


class SandboxProvider(PostmarkProvider):
    """The local sandbox (sending/sandbox.py) speaks Postmark's API: the same backend."""

    kind = "sandbox"
    default_api_url = SANDBOX_API_URL

    def server_token(self) -> str:
        return self.credentials.get("api_key") or SANDBOX_API_KEY


def _refused_locally(exc) -> SendError | None:
    """anymail refused the message before calling the provider: it cannot go as it is."""
    from anymail.exceptions import (
        AnymailInvalidAddress,
        AnymailSerializationError,
        AnymailUnsupportedFeature,
    )

    if isinstance(
        exc, AnymailInvalidAddress | AnymailUnsupportedFeature | AnymailSerializationError
    ):
        return SendError(str(exc.args[0]) if exc.args else str(exc), permanent=True)
    return None


def _anymail_defaults() -> dict:
    """anymail options passed explicitly, so a bare worker needs no ANYMAIL settings."""
    return {
        "ignore_unsupported_features": False,
        "ignore_recipient_status": False,
        "debug_api_requests": False,
        "send_defaults": {},
        "idna_encoder": "idna2008",
    }
