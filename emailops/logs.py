"""Log lines that carry the ids they are about, and the JSON format production ships.

`log_ids(customer_id=…, worker_id=…)` is set by the adapters that know the ids (the conductor's
Celery task, the worker API views) for the code they call; a filter on the console handler copies
them onto every record logged inside, so a service's log line is found by its customer without
naming it. Contextvars rather than thread-locals: the worker API's views run their service in a
pool thread through `sync_to_async`, which carries the context over.

    LOG_FORMAT=plain (default)   2026-12-03 17:21:00,000 INFO sending.conductor customer 3: …
    LOG_FORMAT=json              {"time": "…", "level": "INFO", "logger": "…", "message": "…",
                                  "customer_id": 3, …}
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from contextvars import ContextVar, Token

from pythonjsonlogger.core import RESERVED_ATTRS

# The ids a log line may carry; anything else stays out of the context.
IDS = ("customer_id", "message_id", "worker_id", "lease_id")

_ids: ContextVar[dict[str, int]] = ContextVar("emailops_log_ids", default={})  # noqa: B039


@contextlib.contextmanager
def log_ids(**ids: int | None) -> Iterator[None]:
    """Records logged inside carry these ids (None leaves an id out); nests and restores."""
    unknown = set(ids) - set(IDS)
    if unknown:
        raise TypeError(f"log_ids takes {', '.join(IDS)}, not {', '.join(sorted(unknown))}")
    token = _ids.set({**_ids.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _ids.reset(token)


def current_ids() -> dict[str, int]:
    return dict(_ids.get())


class ContextIdsFilter(logging.Filter):
    """Copies the context's ids onto each record; an id passed with `extra=` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _ids.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def logging_config(*, fmt: str, level: str, task_level: str) -> dict:
    """The LOGGING dict for settings: one console handler, plain or JSON."""
    if fmt not in ("plain", "json"):
        raise ValueError(f"LOG_FORMAT must be plain or json, not {fmt!r}")
    formatters = {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            # Every other attribute a record carries (the ids, `extra=`) is added as a field.
            "fmt": ["asctime", "levelname", "name", "message"],
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            # uvicorn's copy of each message with terminal colours.
            "reserved_attrs": [*RESERVED_ATTRS, "color_message"],
        },
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"ids": {"()": "emailops.logs.ContextIdsFilter"}},
        "formatters": {fmt: formatters[fmt]},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": fmt, "filters": ["ids"]}
        },
        "root": {"handlers": ["console"], "level": level},
        # A conductor tick every half second and a watchdog every two would drown everything else.
        "loggers": {
            name: {"level": task_level}
            for name in ("celery.app.trace", "celery.worker.strategy", "celery.beat")
        },
    }


def _task_ids(task, args, kwargs) -> dict[str, int]:
    try:
        bound = inspect.signature(task.run).bind_partial(*(args or ()), **(kwargs or {}))
    except TypeError:
        return {}
    return {k: v for k, v in bound.arguments.items() if k in IDS and isinstance(v, int)}


def connect_celery(app) -> None:
    """Every Celery task's log lines carry the ids among its arguments (`conduct(customer_id)`
    logs with its customer): set before the task runs, in the thread that runs it."""
    from celery import signals

    tokens: dict[str, Token] = {}

    @signals.task_prerun.connect(weak=False)
    def _set(task_id=None, task=None, args=None, kwargs=None, **_):
        ids = _task_ids(task, args, kwargs)
        if ids:
            tokens[task_id] = _ids.set({**_ids.get(), **ids})

    @signals.task_postrun.connect(weak=False)
    def _reset(task_id=None, **_):
        token = tokens.pop(task_id, None)
        if token is not None:
            _ids.reset(token)
