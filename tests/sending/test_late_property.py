"""A property, on PostgreSQL through the real check-in service: whatever the interleaving of
grants, progress marks, sends, lost answers, reports (whole, or partial with sends still out),
late reports, reclaims and re-claims by other workers, no recipient is ever handed to the
provider twice, and what the database says agrees with what the provider received.

The provider is modelled by the test: a worker "starts" a recipient (the provider receives it at
once) only inside the progress mark the API accepted, and its answer may come, or never come (a
timeout: reported `unknown`), or come only after the report went (a late report). The operator's
explicit "retry unknown" is left out: it is the one action allowed to duplicate (it says so).
"""

from collections import Counter
from dataclasses import dataclass, field

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from customers.models import SendLimit
from sending import checkin, leases, tokens, wire
from sending.clock import Clock
from sending.models import Recipient
from sending.wire import parse_progress
from tests.factories import T0, call, make_customer, make_message

RECIPIENTS = 5
WORKERS = 2
FAR_FUTURE = T0 + 3_600_000  # every open lease is overdue by then


@dataclass
class SimWorker:
    row: object
    token: str
    seq: int = 0
    batch: list[int] | None = None  # the open lease's recipients, in order
    lease_id: int = 0
    mark: int = 0  # accepted by the API
    started: list[int] = field(default_factory=list)
    answered: set[int] = field(default_factory=set)
    timed_out: set[int] = field(default_factory=set)
    # Sends left out of a report, still out: lease id -> recipients.
    out: dict[int, list[int]] = field(default_factory=dict)
    late: list[dict] = field(default_factory=list)  # for the next check-in
    delivered: list[dict] = field(default_factory=list)  # late reports sent, for replays
    stopped: bool = False


class World:
    def __init__(self):
        self.customer = make_customer(per_minute=1_000, batch_size=3, max_workers=WORKERS)
        SendLimit.objects.filter(customer=self.customer).update(max_workers=WORKERS)
        self.message = make_message(self.customer, RECIPIENTS)
        self.received: Counter[int] = Counter()
        self.answered: set[int] = set()  # the provider answered "sent" (and the worker knew)
        self.reported_sent: set[int] = set()  # ... and said so to the API, on time or late
        self.workers = []
        for _ in range(WORKERS):
            row, token = checkin.worker_start(customer_id=self.customer.pk)
            self.workers.append(SimWorker(row, token))
        self.now = T0

    def checkin(self, w: SimWorker, report=None, *, final=False):
        """A check-in, with the late reports the worker has ready (as the worker loop sends)."""
        w.seq += 1
        self.now += 10
        late, w.late = w.late, []
        answer = call(w.row, w.token, w.seq, report, at=self.now, late=late, final=final)
        w.delivered += late
        for sent in (report or {}, *late):
            self.reported_sent.update(
                r["id"] for r in sent.get("results", ()) if r["status"] == "sent"
            )
        w.token = answer["token"]
        if answer["decision"] == "send":
            w.batch = [r["id"] for r in answer["batch"]["recipients"]]
            w.lease_id = answer["batch"]["lease_id"]
            w.mark, w.started = 0, []
            w.answered, w.timed_out = set(), set()
        elif answer["decision"] == "stop":
            w.stopped = True

    # The actions.

    def ask(self, w: SimWorker):
        if w.batch is None and not w.stopped:
            self.checkin(w)

    def progress(self, w: SimWorker, more: int):
        if w.batch is None:
            return
        mark = min(len(w.batch), w.mark + more)
        try:
            leases.record_progress(
                claims=tokens.verify(w.token),
                request=parse_progress(
                    {"worker_id": w.row.pk, "lease_id": w.lease_id, "started_through": mark}
                ),
            )
        except wire.Conflict:
            return  # refused (reclaimed): the worker starts nothing past its accepted mark
        w.mark = mark

    def start(self, w: SimWorker):
        if w.batch is None or len(w.started) >= w.mark:
            return
        recipient = w.batch[len(w.started)]
        w.started.append(recipient)
        self.received[recipient] += 1
        assert self.received[recipient] == 1, f"recipient {recipient} was sent twice"

    def answer(self, w: SimWorker, sent: bool):
        pending = [r for r in w.started if r not in w.answered | w.timed_out]
        if pending:
            (w.answered if sent else w.timed_out).add(pending[0])
            if sent:
                self.answered.add(pending[0])

    def report(self, w: SimWorker, partial: bool):
        if w.batch is None:
            return
        results, out = [], []
        for index, recipient in enumerate(w.batch):
            if recipient in w.answered:
                results.append(_sent(recipient))
            elif recipient in w.timed_out:
                results.append({"id": recipient, "status": "unknown", "error": "timeout"})
            elif recipient in w.started:
                if partial:
                    out.append((recipient, True))  # left out: still in flight
                else:
                    w.answered.add(recipient)  # waited for its answer
                    self.answered.add(recipient)
                    results.append(_sent(recipient))
            elif partial and index < w.mark:
                out.append((recipient, False))  # handed to a send thread, not begun yet
            else:
                results.append({"id": recipient, "status": "not_started"})
        if out:
            w.out[w.lease_id] = out
        report = {"lease_id": w.lease_id, "elapsed_ms": 1, "results": results}
        w.batch = None
        self.checkin(w, report)

    def late(self, w: SimWorker, sent: bool):
        """The rest of a partly reported lease: each send still out was answered or timed out;
        one never begun says so (and, the report gone, it never will begin)."""
        lease_id, out = next(iter(w.out.items()))
        del w.out[lease_id]
        results = []
        for recipient, began in out:
            if not began:
                results.append({"id": recipient, "status": "not_started"})
            elif sent:
                self.answered.add(recipient)
                results.append(_sent(recipient))
            else:
                results.append({"id": recipient, "status": "unknown"})
        w.late.append({"lease_id": lease_id, "elapsed_ms": 1, "results": results})

    def replay(self, w: SimWorker):
        """A late report delivered again with the next check-in (a request repeated): it must
        change nothing that changed since."""
        w.late.append(w.delivered[0])

    def final(self, w: SimWorker):
        """A stopped worker delivers what it still has to say, as it exits."""
        self.checkin(w, final=True)

    def possible(self) -> list[tuple]:
        """The actions that make sense now (each one a real worker or the conductor could do)."""
        steps: list[tuple] = []
        for i, w in enumerate(self.workers):
            if w.batch is None and not w.stopped:
                steps.append(("ask", i))
            if w.batch is not None:
                if w.mark < len(w.batch):
                    steps += [("progress", i, 1), ("progress", i, 3)]
                if len(w.started) < w.mark:
                    steps += [("start", i)] * 2
                if set(w.started) - w.answered - w.timed_out:
                    steps += [("answer", i, True), ("answer", i, False)]
                steps += [("report", i, True), ("report", i, False)]
            if w.out:
                steps += [("late", i, True), ("late", i, False)]
            if w.delivered and not w.late:
                steps.append(("replay", i))
            if w.stopped and w.late:
                steps.append(("final", i))
        if any(w.batch is not None for w in self.workers):
            steps.append(("reclaim",))
        return steps

    def reclaim(self):
        leases.reclaim_overdue(clock=Clock(FAR_FUTURE))

    # What must hold.

    def check(self):
        assert max(self.received.values(), default=0) <= 1
        for row in Recipient.objects.filter(message=self.message):
            if row.status == "sent":
                assert self.received[row.pk] == 1, f"{row.pk} sent in the database only"
                assert row.provider_message_id == f"p{row.pk}"
            elif self.received[row.pk]:
                # The provider has it: the database must not offer it again.
                assert row.status in ("unknown", "leased"), (row.pk, row.status)
            # A report is the truth, whenever it came.
            assert row.pk not in self.reported_sent or row.status == "sent", (row.pk, row.status)


def _sent(recipient):
    return {"id": recipient, "status": "sent", "provider_id": f"p{recipient}", "done_ms": 5}


@pytest.mark.django_db
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_interleaving_of_late_reports_reclaims_and_reclaims_sends_anyone_twice(data):
    with transaction.atomic():
        world = World()
        for _ in range(data.draw(st.integers(5, 40), label="steps")):
            possible = world.possible()
            if not possible:
                break
            name, *args = data.draw(st.sampled_from(possible))
            if name == "reclaim":
                world.reclaim()
            else:
                getattr(world, name)(world.workers[args[0]], *args[1:])
            world.check()
        transaction.set_rollback(True)
