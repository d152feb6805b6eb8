"""The worker's environment: its settings (Django's or, on Lambda, the environment's), the
minimal Django setup it runs on, and a Lambda-like context for local runs."""

import logging
import os
import time
import uuid

# Settings (read at call time; on Lambda, where Django has no settings module, from the
# environment): name -> default.
DEFAULTS: dict[str, float | int] = {
    # Stop between batches when less than max(this, twice the last batch's duration) is left.
    "WORKER_DEADLINE_MARGIN_MS": 10_000,
    # Never start a send with less than this left (the send and the final check-in need it).
    "WORKER_SEND_MARGIN_MS": 3_000,
    # How long a send is taken to need before this worker has seen its provider answer one: no
    # send starts this close to its minute's last safe moment (sending/worker/batch.py).
    "WORKER_ANSWER_GUESS_MS": 1_000,
    # Each API call's timeout, and how often a network error or a 5xx is retried (same seq).
    "WORKER_API_TIMEOUT_S": 10,
    "WORKER_API_RETRIES": 4,
    "WORKER_API_BACKOFF_MS": 250,
    # Lambda's own limit; the local context counts down from this.
    "LOCAL_WORKER_TIMEOUT_S": 60,
}


def ensure_django() -> None:
    """Django's template engine and email classes need settings. A worker needs no database and
    no apps, so unless this process already has settings (the local thread runtime) it gets
    minimal ones: fast to start, on Lambda and in a local worker process alike. Its own knobs
    come from the environment (see `setting`)."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        TIME_ZONE="UTC",
        USE_I18N=False,
        DEFAULT_CHARSET="utf-8",
        INSTALLED_APPS=[],
        LOGGING_CONFIG=None,
    )
    django.setup(set_prefix=False)
    # Lambda's root logger shows only warnings; a worker's batch lines are worth keeping.
    logging.getLogger("sending").setLevel(os.environ.get("LOG_LEVEL", "INFO"))


def setting(name: str):
    """A worker setting: Django's if set there, else the environment's, else the default."""
    from django.conf import settings

    default = DEFAULTS[name]
    value = getattr(settings, name, None)
    if value is None:
        value = os.environ.get(name)
    if value is None:
        return default
    return type(default)(value)


class LocalContext:
    """Lambda's context for local runs: a request id and a remaining time that counts down."""

    function_name = "emailops-local-worker"

    def __init__(self, timeout_s: float, *, aws_request_id: str | None = None):
        self.timeout_s = timeout_s
        self.aws_request_id = aws_request_id or f"local-{uuid.uuid4().hex}"
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))
