"""The worker handler: the same code on AWS Lambda and in the local runtime.

A worker checks in (reporting its last batch), sends the batch it is given through the customer's
provider inside the window it is told, and repeats until told to stop or until its own time runs
short. It never reads the database: everything it needs comes in the check-in answer
(sending/openapi.yaml).

    handler(event, context)     the Lambda entry point; event = {api_url, token, worker_id}
    python -m sending.worker --event '<json>' [--timeout-s 60]

Modules: environment (settings, minimal Django, the local context), client (the worker API over
HTTP), batch (sending one batch inside its window), loop (check in, send, repeat).

Timing. Windows are measured on this process's monotonic clock from the moment the answer arrived
(never on the wall clock). When an answer needed retries it may be a replay of an answer granted
seconds earlier, so the window's END and every `done_ms` are then measured from when the first
attempt was sent: later than the server meant is never allowed for a stop, and a `done_ms` that
is too large only charges a send to the next minute, never the other way.

Crash safety. Before each chunk of about a second of sending (never more than the grant's
`chunk_limit` recipients), the worker tells the API how far into the batch sends may have started
(`started_through`), so a worker that dies leaves at most one chunk in doubt; a send whose outcome
is not known (an unexpected error) is left out of the report, which makes it `unknown` on the
server: never re-sent automatically.
"""

import logging

from .batch import Window
from .client import Api, ApiError, ApiUnavailable
from .environment import DEFAULTS, LocalContext, ensure_django, setting
from .loop import Answer, Summary, WorkerLoop

__all__ = [
    "DEFAULTS",
    "Answer",
    "Api",
    "ApiError",
    "ApiUnavailable",
    "LocalContext",
    "Summary",
    "Window",
    "WorkerLoop",
    "ensure_django",
    "handler",
    "setting",
]

log = logging.getLogger(__name__)


def handler(event: dict, context) -> dict:
    """The Lambda entry point."""
    ensure_django()
    # Imported now, so that loading them does not eat into the first send window.
    import django.core.mail  # noqa: F401

    from .. import providers  # noqa: F401

    worker = WorkerLoop(event, context)
    log.info("worker %s: started as %s", worker.worker_id, worker.request_id)
    return worker.run()
