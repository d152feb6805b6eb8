"""The sending engine's time: a clock read once per operation, and epoch ms <-> aware datetimes."""

import time
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class Clock:
    """The server's time for one check-in or tick, read once."""

    now_ms: int

    @classmethod
    def read(cls) -> "Clock":
        return cls(time.time_ns() // 1_000_000)

    @property
    def now(self) -> datetime:
        return ms_to_datetime(self.now_ms)


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def datetime_to_ms(value: datetime) -> int:
    return round(value.timestamp() * 1000)


def db_datetime(value) -> datetime:
    """A datetime read by raw SQL: SQLite hands back its stored text (naive UTC)."""
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value).replace(tzinfo=UTC)
