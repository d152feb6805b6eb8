"""Fault scenarios for ``python -m bench.e2e --scenario NAME`` and the keys they add.

Each scenario changes what the sandbox does (it runs as its own process, as in the happy path)
or how the customers are set up; the run itself is bench.e2e's. The baseline is not run.

- ``slow``: the sandbox accepts and records every send, then answers 1 in 50 only after the send
  timeout (its late-answer knob, ``POST /_sandbox/late``; a sandbox without it fails the run).
- ``clock-behind``: the sandbox's clock runs 450 ms behind ours (``--clock-offset-ms -450``),
  guard 250 ms, the sandbox enforcing each account's cap (it refuses past it with 429).
- ``storm``: 20 s of 429s from 20 s into the second full minute after the start, then 10 s of
  500s (``POST /_sandbox/faults``). A 500 is a failed attempt: retried with back-off within
  SEND_MAX_ATTEMPTS, then failed for good.
- ``shared``: three customers at 1,000/min each on ONE 1,200/min account (one sandbox key).

Keys added to the JSON (besides bench.e2e's), all read at the provider and in the database:

- ``refused``: 429 answers (the sandbox's cap refusals plus injected 429s);
- ``db_disagrees``: recipients the provider received whose final status is neither ``sent`` nor
  ``unknown`` (nor ``leased``: still in flight when a run hits its time limit), plus recipients
  ``sent`` in the database that the provider never received; ``received_by_db_status`` and
  ``sent_not_received`` break it down;
- ``unknown``: recipients ``unknown`` at the end;
- ``unanswered``: sends whose answer the sandbox held past the send timeout (``slow`` only);
- ``accepted_over_cap_minutes``: account-minutes in which the provider ACCEPTED more than the
  account's cap (per account: the shared customers together). bench.e2e's ``over_cap_minutes``
  counts minutes with more ATTEMPTED than the cap, refusals included; a refusal is by definition
  an attempt past the cap, so under ``clock-behind`` that key counts the minutes the refusals
  landed in;
- ``shared`` only: ``share_min`` / ``share_max``, the lowest and highest of any customer's
  accepted sends in an eligible minute over an equal share of the account's cap, and
  ``account_utilization_min`` (the account's eligible minutes over its cap).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field

SCENARIOS = ("slow", "clock-behind", "storm", "shared")
CLOCK_BEHIND_MS = 450
LATE_FRACTION = 0.02
STORM_429_S = 20
STORM_500_S = 10
SHARED_CAP = 1_200
SHARED_PER_MINUTE = 1_000


@dataclass
class Scenario:
    name: str
    # (label, per-minute, batch_size), as bench.e2e.CUSTOMERS
    customers: list[tuple[str, int, int]]
    shared_cap: int | None = None  # one account with this cap for all the customers
    sandbox_args: list[str] = field(default_factory=list)
    late_delay_ms: int = 0  # slow: how long the held answers are held

    def prepare(self, sandbox_port: int, send_timeout_ms: int) -> None:
        """Set the sandbox up once it is listening (before any send)."""
        if self.name == "slow":
            self.late_delay_ms = send_timeout_ms + 2_000
            body = {"fraction": LATE_FRACTION, "delay_ms": self.late_delay_ms}
            try:
                _post(sandbox_port, "/_sandbox/late", body)
            except urllib.error.HTTPError as exc:
                raise SystemExit(
                    f"bench.e2e --scenario slow: the sandbox has no late-answer knob "
                    f"(POST /_sandbox/late answered {exc.code}); it comes with the faults-report "
                    "change (sending/sandbox LateAnswer)"
                ) from None

    def start(self, sandbox_port: int, window_ms: int) -> threading.Thread | None:
        """What runs beside the send (the storm's injections), started with the messages."""
        if self.name != "storm":
            return None
        thread = threading.Thread(
            target=_storm, args=(sandbox_port, window_ms), name="storm", daemon=True
        )
        thread.start()
        return thread


def scenario(name: str, customers: list[tuple[str, int, int]]) -> Scenario:
    if name == "shared":
        shared = [(f"shared{i}", SHARED_PER_MINUTE, 200) for i in (1, 2, 3)]
        return Scenario(name, shared, shared_cap=SHARED_CAP)
    if name == "clock-behind":
        return Scenario(name, customers, sandbox_args=["--clock-offset-ms", str(-CLOCK_BEHIND_MS)])
    if name in SCENARIOS:
        return Scenario(name, customers)
    raise ValueError(f"no scenario {name!r}: one of {', '.join(SCENARIOS)}")


def _post(port: int, path: str, body: dict) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        response.read()


def _storm(port: int, window_ms: int) -> None:
    """429s from 20 s into the second full minute after now, for 20 s; then 500s for 10 s."""
    now = time.time() * 1000
    at = (now // window_ms + 2) * window_ms + 20_000
    time.sleep(max(0.0, (at - now) / 1000))
    _post(port, "/_sandbox/faults", {"status": 429, "duration_ms": STORM_429_S * 1000})
    print(f"[storm] 429s for {STORM_429_S} s from {time.strftime('%H:%M:%S')}", flush=True)
    time.sleep(STORM_429_S)
    _post(port, "/_sandbox/faults", {"status": 500, "duration_ms": STORM_500_S * 1000})
    print(f"[storm] 500s for {STORM_500_S} s from {time.strftime('%H:%M:%S')}", flush=True)


def sandbox_sends(port: int) -> list[list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sandbox/sends", timeout=60) as response:
        return json.loads(response.read())


def per_customer_minutes(customers, sends, minute_key) -> dict[str, dict[str, int]]:
    """Accepted sends per customer and sandbox minute, told apart by their recipients' domain
    (``@m<message id>.example``): customers sharing one key are counted apart."""
    label_of = {f"@m{c.message_id}.example": c.label for c in customers}
    counts: dict[str, Counter] = {c.label: Counter() for c in customers}
    for arrived_ms, _key, to, _idem in sends:
        label = label_of.get(to[to.rfind("@") :])
        if label is not None:
            counts[label][minute_key(arrived_ms)] += 1
    return {label: dict(sorted(c.items())) for label, c in counts.items()}


def fault_keys(
    *, scenario: Scenario, customers, report: dict, sends: list[list], statuses: dict[int, str]
) -> dict:
    """refused, db_disagrees, unknown, unanswered, accepted_over_cap_minutes."""
    received = {int(idem) for *_, idem in sends if idem.isdigit()}
    keys = {c.api_key for c in customers}
    refused = sum(sum(m.values()) for k, m in report.get("throttled", {}).items() if k in keys)
    refused += int(report.get("faults", {}).get("429", 0))
    # A recipient still leased at the end (a run stopped by its time limit) is in flight, not
    # in disagreement: counted apart.
    received_as = Counter(statuses[rid] for rid in received if rid in statuses)
    disagree = sum(n for s, n in received_as.items() if s not in (*_RECEIVED, "leased"))
    sent_not_received = sum(1 for rid, s in statuses.items() if s == "sent" and rid not in received)
    disagree += sent_not_received
    late = sum(n for k, n in report.get("late", {}).items() if k in keys)
    caps = {c.api_key: scenario.shared_cap or c.cap for c in customers}
    over = sum(
        1
        for key, minutes in report.get("accepted_per_minute", {}).items()
        if key in caps
        for n in minutes.values()
        if n > caps[key]
    )
    return {
        "refused": refused,
        "db_disagrees": disagree,
        "unknown": sum(1 for s in statuses.values() if s == "unknown"),
        "unanswered": late if scenario.name == "slow" else 0,
        "accepted_over_cap_minutes": over,
        "received_by_db_status": dict(received_as),
        "sent_not_received": sent_not_received,
    }


_RECEIVED = ("sent", "unknown")


def shared_keys(*, scenario: Scenario, details: dict) -> dict:
    """The shared account's split: each customer's eligible minutes over an equal share, and the
    account's utilization in the minutes where every customer was eligible."""
    if scenario.shared_cap is None:
        return {}
    equal = scenario.shared_cap / len(details)
    ratios = []
    totals: dict[str, list[int]] = defaultdict(list)
    for d in details.values():
        for row in d["rows"]:
            totals[row["minute"]].append(row["accepted"] if not row["excluded"] else -1)
            if not row["excluded"]:
                ratios.append(row["accepted"] / equal)
    account = [
        sum(v) / scenario.shared_cap
        for v in totals.values()
        if len(v) == len(details) and min(v) >= 0
    ]
    return {
        "share_min": min(ratios, default=None),
        "share_max": max(ratios, default=None),
        "account_utilization_min": min(account, default=None),
    }
