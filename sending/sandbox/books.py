"""The sandbox's books: caps per API key and calendar minute (on its own, optionally skewed
clock), every accepted send, duplicates by idempotency key, and injected faults."""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus

IDEMPOTENCY_HEADER = "x-emailops-idempotency-key"
IDEMPOTENCY_METADATA = "emailops_recipient_id"
UNKNOWN_KEY_TEXT = (
    "The Server Token you provided in the X-Postmark-Server-Token request header was invalid. "
    "Please verify that you are using a valid token."
)


@dataclass(frozen=True)
class Send:
    """One accepted send, as the sandbox saw it arrive."""

    arrived_ms: int
    api_key: str
    to: str
    subject: str
    idempotency_key: str
    message_id: str
    duplicate: bool
    # The message's List-Unsubscribe and List-Unsubscribe-Post headers, as they arrived.
    unsubscribe: tuple[str, str] = ("", "")


@dataclass(frozen=True)
class Latency:
    """Lognormal answer delay; zero median means none."""

    median_ms: float = 0.0
    p99_ms: float = 0.0

    def sample_s(self) -> float:
        if self.median_ms <= 0:
            return 0.0
        if self.p99_ms <= self.median_ms:
            return self.median_ms / 1000
        sigma = math.log(self.p99_ms / self.median_ms) / 2.3263  # z of the 99th percentile
        return random.lognormvariate(math.log(self.median_ms), sigma) / 1000


@dataclass
class Fault:
    """Answer `status` instead of sending: to a `fraction` of requests, for `count` requests
    (None: unlimited) and/or until `until_ms` on the sandbox clock (None: no end)."""

    status: int
    fraction: float = 1.0
    count: int | None = None
    until_ms: int | None = None

    def active(self, now_ms: int) -> bool:
        if self.count is not None and self.count <= 0:
            return False
        return self.until_ms is None or now_ms < self.until_ms


@dataclass(frozen=True)
class LateAnswer:
    """Hold the answer to a `fraction` of accepted requests for `delay_ms`: the messages are
    accepted and recorded first, so a client that gives up waiting has still sent them.
    Fraction 0 turns it off."""

    fraction: float = 0.0
    delay_ms: int = 0

    def __post_init__(self):
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float):
            raise ValueError("fraction must be a number from 0 to 1")
        if not 0 <= self.fraction <= 1:
            raise ValueError("fraction must be from 0 to 1")
        if isinstance(self.delay_ms, bool) or not isinstance(self.delay_ms, int):
            raise ValueError("delay_ms must be a whole number of milliseconds")
        if self.delay_ms < 0:
            raise ValueError("delay_ms must be ≥ 0")

    def hold_s(self) -> float:
        """How long to hold this answer: delay_ms for the chosen fraction, else 0."""
        if self.fraction <= 0 or self.delay_ms <= 0:
            return 0.0
        if self.fraction >= 1 or random.random() < self.fraction:
            return self.delay_ms / 1000
        return 0.0


class ErrorAnswer(Exception):
    """An HTTP answer other than success, raised from inside request handling."""

    def __init__(self, status: int, body: dict, headers: dict | None = None):
        super().__init__(body.get("Message", ""))
        self.status = status
        self.body = body
        self.headers = headers or {}


def minute_key(ms: int) -> str:
    return datetime.fromtimestamp(ms // 60_000 * 60, tz=UTC).strftime("%Y-%m-%dT%H:%M")


class Ledger:
    """The sandbox's books: caps, what arrived when, duplicates. Every method is thread-safe."""

    def __init__(
        self,
        *,
        caps: dict[str, int | None] | None = None,
        default_cap: int | None = None,
        clock: Callable[[], int] | None = None,
        clock_offset_ms: int = 0,
        speed: float = 1,
        enforce: bool = True,
    ):
        self.caps = dict(caps or {})
        # How many of the clock's milliseconds pass in a real one (tests run minutes sped up).
        # Retry-After is said in real seconds, as a real provider's is.
        self.speed = speed
        self.default_cap = default_cap
        self.clock_offset_ms = clock_offset_ms
        self.enforce = enforce
        self._clock = clock or (lambda: time.time_ns() // 1_000_000)
        self._lock = threading.Lock()
        self.faults: list[Fault] = []
        self._clear()

    def _clear(self) -> None:
        self.sends: list[Send] = []
        self._seen: set[tuple[str, str]] = set()
        # Per key and minute: requests the cap counts (duplicates too: the provider saw them),
        # new sends, requests refused by the cap.
        self._attempts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._accepted: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._new: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._throttled: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._duplicates: dict[str, int] = defaultdict(int)
        self._faulted: dict[int, int] = defaultdict(int)
        self._late: dict[str, int] = defaultdict(int)  # answers held late, per key

    def now_ms(self) -> int:
        return self._clock() + self.clock_offset_ms

    def reset(self) -> None:
        with self._lock:
            self._clear()
            self.faults = []

    def set_caps(self, caps: dict[str, int | None]) -> None:
        with self._lock:
            self.caps.update(caps)

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def cap_for(self, api_key: str) -> int | None:
        """The key's cap (None: no cap); ErrorAnswer(401) for a key the sandbox does not know."""
        if api_key in self.caps:
            return self.caps[api_key]
        if api_key and self.default_cap is not None:
            return self.default_cap
        raise ErrorAnswer(HTTPStatus.UNAUTHORIZED, {"ErrorCode": 10, "Message": UNKNOWN_KEY_TEXT})

    def admit(self, api_key: str, messages: list[dict]) -> list[dict]:
        """Count the request at arrival; record its messages, or raise ErrorAnswer (fault, 429)."""
        with self._lock:
            now = self.now_ms()
            cap = self.cap_for(api_key)
            self._maybe_fault(now)
            minute = minute_key(now)
            attempts = self._attempts[api_key]
            if cap is not None and attempts[minute] + len(messages) > cap:
                attempts[minute] += len(messages)
                self._throttled[api_key][minute] += len(messages)
                if self.enforce:
                    raise self._too_many(now, cap)
            else:
                attempts[minute] += len(messages)
            self._accepted[api_key][minute] += len(messages)
            return [self._record(now, minute, api_key, m) for m in messages]

    def _maybe_fault(self, now: int) -> None:
        for fault in self.faults:
            if fault.active(now) and (fault.fraction >= 1 or random.random() < fault.fraction):
                if fault.count is not None:
                    fault.count -= 1
                self._faulted[fault.status] += 1
                raise ErrorAnswer(
                    fault.status,
                    {"ErrorCode": fault.status, "Message": "Injected fault (sandbox)."},
                    {"Retry-After": "1"} if fault.status == HTTPStatus.TOO_MANY_REQUESTS else {},
                )

    def _too_many(self, now: int, cap: int) -> ErrorAnswer:
        reset_ms = (now // 60_000 + 1) * 60_000
        headers = {
            "Retry-After": str(math.ceil((reset_ms - now) / 1000 / self.speed)),
            "X-RateLimit-Limit": str(cap),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(reset_ms // 1000),
        }
        body = {
            "ErrorCode": 429,
            "Message": f"Rate limit exceeded: at most {cap} messages per minute for this token.",
        }
        return ErrorAnswer(HTTPStatus.TOO_MANY_REQUESTS, body, headers)

    def _record(self, now: int, minute: str, api_key: str, message: dict) -> dict:
        key = idempotency_key(message)
        duplicate = bool(key) and (api_key, key) in self._seen
        if duplicate:
            self._duplicates[api_key] += 1
        else:
            if key:
                self._seen.add((api_key, key))
            self._new[api_key][minute] += 1
        message_id = str(uuid.uuid4())
        to = str(message.get("To", ""))
        self.sends.append(
            Send(
                now,
                api_key,
                to,
                str(message.get("Subject", "")),
                key,
                message_id,
                duplicate,
                (_header(message, "List-Unsubscribe"), _header(message, "List-Unsubscribe-Post")),
            )
        )
        submitted = datetime.fromtimestamp(now / 1000, tz=UTC).isoformat(timespec="milliseconds")
        return {
            "To": to,
            "SubmittedAt": submitted.replace("+00:00", "Z"),
            "MessageID": message_id,
            "ErrorCode": 0,
            "Message": "OK",
        }

    def rate_headers(self, api_key: str) -> dict:
        with self._lock:
            cap = self.caps.get(api_key, self.default_cap)
            if cap is None:
                return {}
            now = self.now_ms()
            used = self._attempts[api_key].get(minute_key(now), 0)
            return {
                "X-RateLimit-Limit": str(cap),
                "X-RateLimit-Remaining": str(max(cap - used, 0)),
                "X-RateLimit-Reset": str((now // 60_000 + 1) * 60),
            }

    def note_late(self, api_key: str, messages: int) -> None:
        """Count messages whose answer is being held late (accepted and recorded already)."""
        with self._lock:
            self._late[api_key] += messages

    def sends_so_far(self) -> list[Send]:
        with self._lock:
            return list(self.sends)

    def report(self) -> dict:
        with self._lock:
            over: dict[str, dict[str, int]] = {}
            for api_key, minutes in self._attempts.items():
                cap = self.caps.get(api_key, self.default_cap)
                if cap is None:
                    continue
                over_minutes = {m: n for m, n in sorted(minutes.items()) if n > cap}
                if over_minutes:
                    over[api_key] = over_minutes
            return {
                # New (first-time) sends per key and calendar minute.
                "per_minute": _plain(self._new),
                # Accepted requests per minute, duplicates included: what the cap counted.
                "accepted_per_minute": _plain(self._accepted),
                "duplicates": dict(self._duplicates),
                "total": {k: sum(m.values()) for k, m in self._new.items()},
                # Minutes in which more was attempted than the cap allows (refused or not).
                "over_cap_minutes": over,
                "throttled": _plain(self._throttled),
                "faults": {str(status): n for status, n in self._faulted.items()},
                # Accepted messages whose answer was held late (LateAnswer), per key.
                "late": dict(self._late),
                "caps": dict(self.caps),
                "default_cap": self.default_cap,
                "clock_offset_ms": self.clock_offset_ms,
            }


def _plain(nested: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {k: dict(sorted(v.items())) for k, v in nested.items() if v}


def _header(message: dict, name: str) -> str:
    for header in message.get("Headers") or []:
        if isinstance(header, dict) and str(header.get("Name", "")).lower() == name.lower():
            return str(header.get("Value", ""))
    return ""


def idempotency_key(message: dict) -> str:
    headers = message.get("Headers") or []
    if isinstance(headers, list):
        for header in headers:
            if isinstance(header, dict) and str(header.get("Name", "")).lower() == (
                IDEMPOTENCY_HEADER
            ):
                return str(header.get("Value", ""))
    metadata = message.get("Metadata")
    if isinstance(metadata, dict) and metadata.get(IDEMPOTENCY_METADATA) is not None:
        return str(metadata[IDEMPOTENCY_METADATA])
    return ""
