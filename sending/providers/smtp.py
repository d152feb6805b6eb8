"""SMTP through Django's SMTP backend; SMTP replies mapped to throttled, temporary or permanent."""

from __future__ import annotations

import contextlib
import smtplib
from email.utils import make_msgid

from . import Provider, SendError, Throttled

SMTP_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
# SMTP replies that mean "too many, slow down" rather than "this message is wrong".
# 421: service closing (also rate limits); 451: local error / rate limited ("4.7.1");
# 454: SES SMTP's "Throttling failure: Maximum sending rate exceeded". 452 is left out: it
# means full storage or too many recipients, and backing off the whole customer would not help.
SMTP_THROTTLE_CODES = frozenset({421, 451, 454})


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
