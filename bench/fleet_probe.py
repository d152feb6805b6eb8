"""Counters that ``bench.fleet`` loads into the fleet's own processes (never in production).

The Celery worker runs ``-A bench.fleet_probe`` (the project's Celery app, plus these counters)
and the web process ``bench.fleet_probe:application`` (the project's ASGI app, wrapped). In each:

- every SQL statement the process sends through Django is counted (a wrapper added to each
  database connection as it is made), PostgreSQL having no pg_stat_statements here;
- the web process counts the worker check-ins and progress calls it answers, the Celery worker
  the conductor tasks it ran (so the bench shows how the worker processes share them);
- the Celery worker splits its CPU between the simulated workers' threads (``worker-N`` and
  their ``send_N`` pools, which run in this process in the LOCAL runtime's thread mode: Lambda
  in production) and everything else (the conductor: Celery's threads, the ticks, publishing).
  A thread's CPU is read from ``/proc/self/task`` every second, so a thread that ends loses at
  most its last second.

Every second the totals go to Redis (``fleet:<pid>:*``) for the bench to read.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

from django.db.backends.signals import connection_created

_lock = threading.Lock()
_counts = {"statements": 0, "checkins": 0, "progress": 0, "conductor_tasks": 0}
_role = "web" if "uvicorn" in sys.argv[0] else "celery"
_WORKER_THREADS = ("worker-", "send_")


def _count_statement(execute, sql, params, many, context):
    with _lock:
        _counts["statements"] += 1
    return execute(sql, params, many, context)


def _wrap(sender, connection, **kwargs):
    if _count_statement not in connection.execute_wrappers:
        connection.execute_wrappers.append(_count_statement)


def _thread_cpu_s(native_id: int) -> float | None:
    try:
        with open(f"/proc/self/task/{native_id}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _report_forever() -> None:
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    seen: dict[int, float] = {}  # worker-side threads: native id -> last CPU seen
    while True:
        for thread in threading.enumerate():
            if thread.name.startswith(_WORKER_THREADS) and thread.native_id is not None:
                cpu = _thread_cpu_s(thread.native_id)
                if cpu is not None:
                    seen[thread.native_id] = cpu
        times = os.times()
        with _lock:
            counts = dict(_counts)
        counts.update(
            role=_role,
            cpu_s=times.user + times.system,
            worker_threads_cpu_s=sum(seen.values()),
            at=time.time(),
        )
        # The bench's Redis may be gone at the end: keep counting.
        with contextlib.suppress(Exception):
            client.set(f"fleet:probe:{os.getpid()}", json.dumps(counts), ex=3600)
        time.sleep(1)


def _start() -> None:
    connection_created.connect(_wrap, weak=False)
    threading.Thread(target=_report_forever, name="fleet-probe", daemon=True).start()


if _role == "web":
    from emailops.asgi import application as _inner

    async def application(scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith(("/checkin", "/progress")):
            with _lock:
                _counts["checkins" if scope["path"].endswith("/checkin") else "progress"] += 1
        await _inner(scope, receive, send)

    _start()
else:
    from celery.signals import task_postrun

    from emailops.celery import app  # noqa: F401 - `celery -A bench.fleet_probe` finds it

    @task_postrun.connect(weak=False)
    def _count_task(sender=None, **kwargs):
        if sender is not None and sender.name.startswith("sending.tasks.conduct"):
            with _lock:
                _counts["conductor_tasks"] += 1

    _start()
