"""CPU time of other processes, read from /proc (Linux): a process and its descendants (a server
and its workers), and the PostgreSQL backends serving the current database. A figure per unit
of work from these is robust to a shared machine in a way throughput and latency are not."""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """The process and its descendants (read now: call once the workers are up)."""
    found = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    found += tree(int(child))
    except OSError:
        pass
    return found


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (exited ones count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def database_backends() -> list[int]:
    """PIDs of the PostgreSQL backends connected to this connection's database, but its own."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        )
        return [row[0] for row in cursor.fetchall()]
