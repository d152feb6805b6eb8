"""How mail leaves: one small interface over Django email backends (SMTP, anymail SES, Postmark).

One module per provider family: smtp, ses, postmark (the sandbox speaks Postmark's API).

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
import threading
from email.utils import parseaddr
from typing import Any

IDEMPOTENCY_HEADER = "X-EmailOps-Idempotency-Key"
IDEMPOTENCY_METADATA = "emailops_recipient_id"
# RFC 8058: a mailbox provider POSTs this body to the List-Unsubscribe https URL.
ONE_CLICK = "List-Unsubscribe=One-Click"
DEFAULT_TIMEOUT_S = 5.0  # matches SEND_TIMEOUT_MS: nothing may arrive later than this after a start
# The largest `concurrency` a batch asks for: the SES client is shared by all send threads.
MAX_CONCURRENCY = 64


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
    from .postmark import PostmarkProvider, SandboxProvider
    from .ses import AmazonSesProvider
    from .smtp import SmtpProvider

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
    if config.get("credentials_ref"):
        # Held by reference: read here, with this worker's own AWS role (references.py).
        from .references import resolve

        credentials = resolve(config["credentials_ref"])
    if timeout is None:
        timeout = float(settings.get("timeout", DEFAULT_TIMEOUT_S))
    return classes[kind](settings=settings, credentials=credentials, timeout=timeout)


def unsubscribe_headers(url: str, *, mailto: str = "") -> dict[str, str]:
    """The RFC 2369 / RFC 8058 headers for one recipient's copy (none without a URL)."""
    if not url:
        return {}
    value = f"<{url}>"
    if mailto:
        value += f", <mailto:{mailto}?subject=unsubscribe>"
    return {"List-Unsubscribe": value, "List-Unsubscribe-Post": ONE_CLICK}


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
        unsubscribe_url: str = "",
        unsubscribe_mailto: str = "",
    ) -> str:
        """Hand one email to the provider and return the provider's message id.

        With `unsubscribe_url` the message carries List-Unsubscribe (the URL, and the mailto if
        given) and List-Unsubscribe-Post: one-click unsubscribe, RFC 8058."""
        check_address(to)
        message = self.build_message(
            recipient_id=recipient_id,
            to=to,
            subject=subject,
            text=text,
            html=html,
            from_email=from_email,
            reply_to=reply_to,
            headers=unsubscribe_headers(unsubscribe_url, mailto=unsubscribe_mailto),
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

    def build_message(
        self, *, recipient_id, to, subject, text, html, from_email, reply_to, headers=None
    ):
        from django.core.mail import EmailMultiAlternatives

        message = EmailMultiAlternatives(
            subject=subject,
            body=text,
            from_email=from_email,
            to=[to],
            reply_to=[reply_to] if reply_to else None,
            headers={**(headers or {}), IDEMPOTENCY_HEADER: str(recipient_id)},
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


def refused_locally(exc) -> SendError | None:
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


def anymail_defaults() -> dict:
    """anymail options passed explicitly, so a bare worker needs no ANYMAIL settings."""
    return {
        "ignore_unsupported_features": False,
        "ignore_recipient_status": False,
        "debug_api_requests": False,
        "send_defaults": {},
        "idna_encoder": "idna2008",
    }


# The families' error mappings, re-exported for callers that map errors themselves.
from .postmark import postmark_error  # noqa: E402
from .ses import ses_error  # noqa: E402
from .smtp import smtp_error  # noqa: E402

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "IDEMPOTENCY_HEADER",
    "IDEMPOTENCY_METADATA",
    "MAX_CONCURRENCY",
    "ONE_CLICK",
    "Provider",
    "SendError",
    "Throttled",
    "check_address",
    "open_provider",
    "postmark_error",
    "ses_error",
    "smtp_error",
    "unsubscribe_headers",
]
