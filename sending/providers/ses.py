"""Amazon SES v2 through anymail's backend, one boto3 client shared by the sending threads."""

from __future__ import annotations

from email.utils import make_msgid
from typing import Any

from . import MAX_CONCURRENCY, Provider, SendError, Throttled, anymail_defaults, refused_locally

SES_BACKEND = "anymail.backends.amazon_ses.EmailBackend"  # anymail's SES v2 backend
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
        return {**kwargs, **anymail_defaults()}

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
        return refused_locally(exc) or ses_error(
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
