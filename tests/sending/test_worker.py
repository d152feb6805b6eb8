"""The worker handler: step by step against fakes, and end to end against the real worker API
(served by uvicorn, as production serves it) and a real sandbox provider.

The end-to-end tests use 2-second "minutes" (SEND_WINDOW_MS) so that windows, throttles and lease
expiry happen within a test; every wait is bounded.
"""

import math
import threading
import time

import pytest
import requests
from django.db import OperationalError

from sending import leases, pacing
from sending.clock import Clock, datetime_to_ms
from sending.models import Lease, Recipient
from sending.models import Worker as WorkerRow
from sending.providers import SendError, Throttled
from sending.runtimes import LocalRuntime, local_invocation
from sending.sandbox import Latency, SandboxServer
from sending.worker import Api, LocalContext, Window, WorkerLoop, handler
from sending.worker.batch import BatchRun
from tests.factories import (
    API_KEY,
    assert_sent_once_each,
    make_message,
    sandbox_customer,
    start_worker,
    statuses,
)


def wait_for(predicate, timeout_s=15.0, every_s=0.01):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OperationalError as exc:
            # SQLite's shared in-memory test database locks whole tables while the server writes.
            if "locked" not in str(exc):
                raise
            value = None
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {predicate.__name__}")


# --- step by step, against fakes ---------------------------------------------------------------


class FakeApi:
    """Records progress calls with the time they were made."""

    def __init__(self, clock):
        self.clock = clock
        self.token = "t"
        self.last_attempts = 1
        self.progress: list[tuple[float, int]] = []

    def post(self, path, body):
        assert path == "progress"
        self.progress.append((self.clock(), body["started_through"]))

    def close(self):
        pass


class RecordingProvider:
    """Sleeps `send_s` per send; raises what `fail` returns for a recipient id, if anything."""

    def __init__(self, send_s=0.02, fail=None):
        self.send_s = send_s
        self.fail = fail or (lambda rid, n: None)
        self.lock = threading.Lock()
        self.starts: dict[int, float] = {}
        self.closed = False

    def send(self, *, recipient_id, to, subject, text, html, from_email, reply_to, **unsubscribe):
        with self.lock:
            self.starts[recipient_id] = time.monotonic()
            n = len(self.starts)
        time.sleep(self.send_s)
        error = self.fail(recipient_id, n)
        if error is not None:
            raise error
        assert subject == f"Hello {recipient_id}" and html == f"<p>{recipient_id} &amp; co</p>"
        return f"p-{recipient_id}"

    def close(self):
        self.closed = True


class Remaining:
    """A Lambda context whose remaining time the test sets."""

    aws_request_id = "test-invocation"

    def __init__(self, ms=60_000):
        self.ms = ms

    def get_remaining_time_in_millis(self):
        return self.ms


def fake_batch(
    n,
    *,
    start_in_ms=0,
    stop_starting_in_ms=5_000,
    concurrency=2,
    chunk_limit=None,
    send_timeout_ms=None,
    answer_by_in_ms=None,
):
    # chunk_limit=None, send_timeout_ms=None, answer_by_in_ms=None: the field is left out, as an
    # older server does.
    return {
        "lease_id": 7,
        "start_in_ms": start_in_ms,
        "stop_starting_in_ms": stop_starting_in_ms,
        "minute_ends_in_ms": 59_000,
        "concurrency": concurrency,
        **({} if chunk_limit is None else {"chunk_limit": chunk_limit}),
        **({} if send_timeout_ms is None else {"send_timeout_ms": send_timeout_ms}),
        **({} if answer_by_in_ms is None else {"answer_by_in_ms": answer_by_in_ms}),
        "provider": {"kind": "sandbox", "settings": {}, "credentials": {}, "per_minute_cap": 9},
        "messages": {
            "3": {
                "subject": "Hello {{ first_name }}",
                "text": "Hi {{ first_name }}",
                "html": "<p>{{ first_name }} &amp; co</p>",
                "from_email": "news@u.example",
                "reply_to": "",
            }
        },
        "recipients": [
            {"id": i, "message": 3, "to": f"s{i}@u.example", "merge": {"first_name": i}}
            for i in range(1, n + 1)
        ],
    }


def fake_worker(provider, context=None):
    api = FakeApi(time.monotonic)
    worker = WorkerLoop(
        {"api_url": "http://api.invalid/", "token": "t", "worker_id": 1},
        context or Remaining(),
        api=api,
        provider_factory=lambda config: provider,
    )
    return worker, api


def send_now(worker, batch):
    now = time.monotonic()
    window = Window.of(batch, received=now, first_sent=now)
    return window, worker.send_batch(batch, window)


def test_sends_start_only_inside_the_window_and_after_their_progress_mark():
    provider = RecordingProvider(send_s=0.05)
    worker, api = fake_worker(provider)
    # A window of a second: a pause of a few hundred ms (a busy CI machine, a full garbage
    # collection late in the suite) still leaves it sending.
    batch = fake_batch(200, start_in_ms=200, stop_starting_in_ms=1_200, concurrency=3)
    window, report = send_now(worker, batch)

    starts = provider.starts
    assert starts, "nothing was sent"
    assert all(window.start_at <= t <= window.stop_at for t in starts.values())
    by_status = {}
    for result in report["results"]:
        by_status.setdefault(result["status"], []).append(result["id"])
    assert sorted(by_status["sent"]) == sorted(starts)
    assert 10 <= len(starts) <= 80  # ~1 s, 3 in flight, 50 ms each: about 60
    assert by_status["not_started"] == list(range(len(starts) + 1, 201))  # in batch order
    # Each send started after a progress call that covered it; the first chunk is `concurrency`.
    assert api.progress[0][1] == 3
    for rid, started in starts.items():
        assert any(at <= started and mark >= rid for at, mark in api.progress), rid
    marks = [mark for _, mark in api.progress]
    assert marks == sorted(marks) and marks[-1] < 200
    for result in report["results"]:
        if result["status"] == "sent":
            assert result["provider_id"] == f"p-{result['id']}"
            assert 200 <= result["done_ms"] <= 1_500
    assert 0 < report["elapsed_ms"] < 1_500


def test_no_progress_call_declares_more_than_the_grants_chunk_limit():
    provider = RecordingProvider(send_s=0.02)
    worker, api = fake_worker(provider)
    worker.rate_per_s = 500.0  # a fast worker: a second of sending would be 500 recipients
    batch = fake_batch(30, start_in_ms=100, concurrency=4, chunk_limit=3)
    _, report = send_now(worker, batch)

    assert [r["status"] for r in report["results"]] == ["sent"] * 30
    marks = [mark for _, mark in api.progress]
    # The first chunk, announced before the window opens, is the limit, not `concurrency`.
    assert marks[0] == 3
    steps = [b - a for a, b in zip([0, *marks], marks, strict=False)]
    assert marks[-1] == 30 and max(steps) <= 3 and min(steps) > 0
    # Each send started after a progress call that covered it.
    for rid, started in provider.starts.items():
        assert any(at <= started and mark >= rid for at, mark in api.progress), rid


def test_a_throttle_stops_new_sends_at_once_and_the_rest_are_not_started():
    throttled_at = []

    def fail(rid, n):
        if n == 5:
            throttled_at.append(time.monotonic())
            return Throttled("HTTP 429: too many")
        return None

    provider = RecordingProvider(send_s=0.03, fail=fail)
    worker, _ = fake_worker(provider)
    _, report = send_now(worker, fake_batch(30, concurrency=3))

    results = {r["id"]: r for r in report["results"]}
    throttled = [r for r in results.values() if r["status"] == "throttled"]
    assert len(throttled) == 1 and "429" in throttled[0]["error"]
    # Sends already in flight finish; none starts after the throttle answer came.
    assert all(t <= throttled_at[0] for t in provider.starts.values())
    assert {r["status"] for r in results.values()} == {"sent", "throttled", "not_started"}
    assert len(results) == 30
    assert worker.summary.throttled == 1
    assert worker.summary.not_started == 30 - len(provider.starts)


def test_failures_are_reported_as_the_provider_answered_and_unknowns_are_left_out():
    def fail(rid, n):
        return {
            2: SendError("550 no such user", permanent=True),
            3: SendError("connection reset", permanent=False),
            4: RuntimeError("a bug, or a timeout after the request went out"),
            6: SendError("read timed out", permanent=False, maybe_sent=True),
        }.get(rid)

    provider = RecordingProvider(fail=fail)
    worker, _ = fake_worker(provider)
    _, report = send_now(worker, fake_batch(6))
    results = {r["id"]: r for r in report["results"]}
    assert results[1]["status"] == results[5]["status"] == "sent"
    assert (results[2]["status"], results[2]["permanent"]) == ("failed", True)
    assert (results[3]["status"], results[3]["permanent"]) == ("failed", False)
    assert results[3]["error"] == "connection reset" and "done_ms" in results[3]
    # The send may have reached the provider: left out, the server marks it unknown.
    assert 4 not in results
    # In doubt by the provider's own word: unknown, never failed (a failure would be re-sent).
    assert (results[6]["status"], results[6]["error"]) == ("unknown", "read timed out")
    assert "permanent" not in results[6]
    assert worker.summary.unknown == 2


def test_an_unknown_is_reported_done_no_earlier_than_its_start_plus_the_send_timeout():
    """A connection lost early says nothing about when the provider takes the message: what the
    server charges by (`done_ms`) is the latest it can have arrived, its start + the timeout."""

    def lost(rid, n):
        return SendError("connection lost after DATA", permanent=False, maybe_sent=True)

    worker, _ = fake_worker(RecordingProvider(send_s=0.01, fail=lost))
    _, report = send_now(worker, fake_batch(1, send_timeout_ms=3_000))
    (result,) = report["results"]
    assert result["status"] == "unknown"
    assert 3_000 <= result["done_ms"] < 4_000
    # A server that does not say its timeout: the moment the worker gave up.
    worker, _ = fake_worker(RecordingProvider(send_s=0.01, fail=lost))
    _, report = send_now(worker, fake_batch(1))
    assert report["results"][0]["done_ms"] < 1_000


def test_no_send_starts_that_would_be_answered_after_the_minutes_last_safe_moment():
    """Such a send is charged to the next minute as well: it would cost the next minute one."""
    provider = RecordingProvider(send_s=0.4)
    worker, _ = fake_worker(provider)
    batch = fake_batch(40, stop_starting_in_ms=5_000, concurrency=2, answer_by_in_ms=2_000)
    window, report = send_now(worker, batch)
    sent = [r for r in report["results"] if r["status"] == "sent"]
    # The first two start on the guess (1 s: room for it), the rest on what they measured
    # (0.4 s, and a quarter on top): starts at about 0, 0.4, 0.8 and 1.2 s.
    assert 6 <= len(sent) <= 8
    assert all(r["done_ms"] <= 2_000 for r in sent)
    assert max(provider.starts.values()) <= window.answer_by - 0.4
    assert [r["status"] for r in report["results"][len(sent) :]] == ["not_started"] * (
        40 - len(sent)
    )
    # The next check-in tells the server, which then ends windows that much earlier.
    assert 400 <= math.ceil(worker.answer_s() * 1000) <= 600


def test_before_its_first_answer_a_worker_plans_by_the_guess_and_by_its_sends_still_out():
    provider = RecordingProvider(send_s=0.01)
    worker, _ = fake_worker(provider)
    # The guess (1 s) leaves no room before the last safe moment, 0.8 s away: nothing starts.
    _, report = send_now(worker, fake_batch(3, answer_by_in_ms=800))
    assert provider.starts == {}
    assert {r["status"] for r in report["results"]} == {"not_started"}
    assert worker.answer_s() == 1.0
    # A send out for 1.5 s already says answers take at least that long.
    run = BatchRun(window=Window.of(fake_batch(1), received=0.0, first_sent=0.0), concurrency=1)
    run.started(1, 10.0)
    assert worker.answer_s(run, 11.5) == 1.5
    assert run.finished(1, 11.6) == pytest.approx(1.6)
    assert worker.answer_s(run, 11.6) == 1.0


def test_no_send_starts_when_the_invocation_is_about_to_time_out():
    provider = RecordingProvider()
    worker, _ = fake_worker(provider, context=Remaining(ms=200))
    _, report = send_now(worker, fake_batch(5))
    assert provider.starts == {}
    assert {r["status"] for r in report["results"]} == {"not_started"}


def test_an_answer_whose_window_closed_on_the_way_is_given_back_unsent_and_said(caplog):
    # Sent 2 s ago, answered now; the window ended 1 s after the request was sent.
    provider = RecordingProvider()
    worker, api = fake_worker(provider)
    batch = fake_batch(4, stop_starting_in_ms=1_000)
    now = time.monotonic()
    window = Window.of(batch, received=now, first_sent=now - 2.0)
    with caplog.at_level("WARNING", logger="sending.worker"):
        report = worker.send_batch(batch, window)
    assert provider.starts == {}
    assert api.progress == []
    assert {r["status"] for r in report["results"]} == {"not_started"}
    assert "giving the batch back" in caplog.text
    assert "came 2000 ms after the check-in was sent, its window closed 1000 ms" in caplog.text


def test_a_window_ends_later_by_what_the_server_held_the_request():
    # Sent at 8.0, answered at 12.0; the server held the request 3 s before reading its clock.
    batch = {**fake_batch(1, start_in_ms=100, stop_starting_in_ms=2_000), "held_ms": 3_000}
    window = Window.of(batch, received=12.0, first_sent=8.0)
    assert window.stop_at == pytest.approx(13.0)  # 8.0 + 3.0 + 2.0: still open on arrival
    assert window.start_at == pytest.approx(12.1)  # the start still counts from the arrival
    assert window.ms(12.5) == 1_500  # done_ms from the earliest the clock can have been read
    # A hold longer than the round trip (it cannot be, but a server may say so) is capped at
    # the arrival: the window never ends later than the server's offset from the arrival.
    held_too_long = {**batch, "held_ms": 9_000}
    assert Window.of(held_too_long, received=12.0, first_sent=8.0).stop_at == pytest.approx(14.0)


def test_an_answer_that_needed_retries_ends_its_window_earlier():
    batch = fake_batch(1, start_in_ms=100, stop_starting_in_ms=1_000)
    window = Window.of(batch, received=10.0, first_sent=8.0)
    assert window.start_at == pytest.approx(10.1)  # never earlier than the server meant
    assert window.stop_at == pytest.approx(9.0)  # never later
    assert window.ms(10.5) == 2_500  # done_ms counted from the earliest possible grant


# --- end to end: the real API over HTTP and the sandbox provider --------------------------------


def test_a_message_is_sent_completely_each_recipient_once_inside_its_windows(
    api_url, sandbox, settings
):
    customer = sandbox_customer(sandbox, batch_size=20, concurrency=4)
    message = make_message(customer, 70)
    worker, event = start_worker(customer, api_url)

    summary = handler(event, LocalContext(20))

    assert summary["stop"] == "done", summary
    assert (summary["sent"], summary["failed"], summary["unknown"]) == (70, 0, 0)
    assert summary["batches"] >= 4
    assert_sent_once_each(message, sandbox)
    assert not Lease.objects.filter(state=Lease.State.OPEN).exists()
    # Every send arrived at the provider inside its lease's start window (plus the send time).
    lease_of = {}
    for lease in Lease.objects.filter(worker=worker):
        for rid in lease.recipient_ids:
            lease_of[str(rid)] = lease
    for send in sandbox.sends:
        lease = lease_of[send.idempotency_key]
        assert send.arrived_ms >= datetime_to_ms(lease.start_at)
        last_start = datetime_to_ms(lease.stop_starting_at)
        assert send.arrived_ms <= last_start + settings.SEND_TIMEOUT_MS
    row = WorkerRow.objects.get(pk=worker.pk)
    assert (row.state, row.stop_reason) == ("stopped", "done")
    assert row.last_seq >= summary["batches"] + 1  # one check-in per batch, plus waits
    # Connections are reused across batches: at most one per sending thread, not per batch.
    assert sandbox.connections_opened <= 4


def test_a_worker_near_its_deadline_stops_between_batches_and_leaves_nothing_leased(
    api_url, sandbox, frozen_server_clock
):
    customer = sandbox_customer(sandbox, per_minute=10, batch_size=10)
    message = make_message(customer, 30)
    _, event = start_worker(customer, api_url)
    context = Remaining(60_000)
    worker = WorkerLoop(event, context)

    answer = worker.checkin()
    assert answer.decision == "send"
    worker.send_batch(answer.batch, answer.window)
    context.ms = 900  # below the deadline margin (1 s in these tests)
    summary = worker.run()

    assert summary["stop"] == "deadline"
    assert (summary["batches"], summary["sent"]) == (1, 10)
    assert worker.seq == 2  # the final check-in delivered the report
    assert not Lease.objects.filter(state=Lease.State.OPEN).exists()
    counts = sorted(statuses(message).values())
    assert counts == ["queued"] * 20 + ["sent"] * 10


def test_a_lost_answer_is_retried_with_the_same_seq_and_replayed(
    api_url, sandbox, frozen_server_clock
):
    customer = sandbox_customer(sandbox)
    make_message(customer, 10)
    _, event = start_worker(customer, api_url)

    class LosesTheFirstAnswer(requests.Session):
        calls = []

        def post(self, url, **kwargs):
            self.calls.append(kwargs["json"].get("seq"))
            response = super().post(url, **kwargs)
            if len(self.calls) == 1:
                raise requests.ConnectionError("connection reset after the request went out")
            return response

    session = LosesTheFirstAnswer()
    api = Api(
        event["api_url"], event["token"], timeout_s=5, retries=2, backoff_ms=10, session=session
    )
    worker = WorkerLoop(event, LocalContext(20), api=api)
    answer = worker.checkin()
    assert answer.decision == "send"
    assert session.calls == [1, 1]
    assert Lease.objects.count() == 1  # the retry got the stored answer, not a second grant
    assert answer.batch["lease_id"] == Lease.objects.get().pk
    assert answer.window.early_origin < answer.window.origin


def test_a_refused_token_is_fatal_and_not_retried(api_url, sandbox):
    customer = sandbox_customer(sandbox)
    make_message(customer, 5)
    _, event = start_worker(customer, api_url)
    event["token"] = "forged"

    summary = handler(event, LocalContext(10))

    assert summary["stop"].startswith("api error: checkin: HTTP 401")
    assert summary["batches"] == 0
    assert not Lease.objects.exists()


def test_a_throttling_provider_loses_nothing_and_sends_nothing_twice(api_url, settings):
    # The sandbox's own minute is frozen so that its cap of 5 cannot reset mid-test.
    sandbox_now = [time.time_ns() // 1_000_000 // 60_000 * 60_000 + 1_000]
    sandbox = SandboxServer(caps={API_KEY: 5}, clock=lambda: sandbox_now[0]).start()
    try:
        customer = sandbox_customer(sandbox, per_minute=30, batch_size=10, concurrency=1)
        message = make_message(customer, 8)
        _, event = start_worker(customer, api_url)
        first = handler(event, LocalContext(3.5))

        assert first["sent"] == 5
        assert first["throttled"] >= 1
        assert first["stop"] == "deadline"
        assert sandbox.report()["throttled"]
        assert not Lease.objects.filter(state=Lease.State.OPEN).exists()
        after_first = statuses(message)
        assert sorted(set(after_first.values())) == ["queued", "sent"]

        # The provider's next minute: another worker (as the conductor would start) sends the
        # rest. The first one exited without saying so (the API has no "final" check-in yet), so
        # stand in for the conductor, which notices a worker that stopped checking in.
        sandbox_now[0] += 60_000
        WorkerRow.objects.filter(pk=event["worker_id"]).update(state=WorkerRow.State.STOPPED)
        _, event = start_worker(customer, api_url)
        second = handler(event, LocalContext(10))

        assert second["stop"] == "done", second
        assert second["sent"] == 3
        assert_sent_once_each(message, sandbox)
    finally:
        sandbox.stop()


def test_a_killed_worker_leaves_its_lease_to_be_reclaimed_and_nothing_past_its_mark_was_sent(
    api_url, frozen_server_clock
):
    sandbox = SandboxServer(caps={API_KEY: 100_000}, latency=Latency(median_ms=200)).start()
    try:
        customer = sandbox_customer(sandbox, batch_size=50, concurrency=5)
        message = make_message(customer, 50)
        _, event = start_worker(customer, api_url)
        runtime = LocalRuntime(mode="process", timeout_s=20)
        request_id = runtime.invoke(**event)
        invocation = local_invocation(request_id)

        def a_chunk_was_announced():
            return Lease.objects.filter(started_through__gt=0).first()

        lease = wait_for(a_chunk_was_announced, timeout_s=20)
        assert invocation.terminate()
        assert invocation.join(5) and invocation.returncode != 0

        lease.refresh_from_db()
        assert lease.state == Lease.State.OPEN
        at_expiry = Clock(datetime_to_ms(lease.expires_at))
        assert leases.reclaim_overdue(clock=at_expiry) == 1
        # The mark the reclaim went by (a progress call the worker made just before it was
        # killed can still be recorded after the kill: the server had the request).
        lease.refresh_from_db()
        mark, ids = lease.started_through, lease.recipient_ids
        assert 0 < mark < len(ids)
        # No send past the announced mark ever reached the provider.
        assert {s.idempotency_key for s in sandbox.sends} <= {str(i) for i in ids[:mark]}
        after = statuses(message)
        assert {after[i] for i in ids[:mark]} == {"unknown"}
        assert {after[i] for i in ids[mark:]} == {"queued"}
        assert not Recipient.objects.filter(status="leased").exists()
    finally:
        sandbox.stop()


def test_against_the_api_no_progress_report_grows_started_through_by_more_than_chunk_limit(
    api_url, sandbox
):
    # 1,000 a minute: chunk_limit is 4, below the concurrency of 8, so the grant's bound (not
    # about a second of sending, not `concurrency`) decides every chunk.
    customer = sandbox_customer(sandbox, per_minute=1_000, batch_size=20, concurrency=8)
    message = make_message(customer, 50)
    _, event = start_worker(customer, api_url)

    class Recording(requests.Session):
        def __init__(self):
            super().__init__()
            self.calls = []  # (path, request body, answer body)

        def post(self, url, **kwargs):
            response = super().post(url, **kwargs)
            answer = response.json() if response.content else None
            self.calls.append((url.rsplit("/", 1)[-1], kwargs["json"], answer))
            return response

    session = Recording()
    api = Api(
        event["api_url"], event["token"], timeout_s=5, retries=2, backoff_ms=10, session=session
    )
    summary = WorkerLoop(event, LocalContext(20), api=api).run()

    assert summary["stop"] == "done", summary
    assert summary["sent"] == 50
    assert_sent_once_each(message, sandbox)
    grants = [a["batch"] for path, _, a in session.calls if path == "checkin" and a.get("batch")]
    assert len(grants) >= 3
    assert {g["chunk_limit"] for g in grants} == {pacing.chunk_limit(1_000)} == {4}
    marks: dict[int, list[int]] = {}
    for path, body, _ in session.calls:
        if path == "progress":
            marks.setdefault(body["lease_id"], []).append(body["started_through"])
    assert set(marks) <= {g["lease_id"] for g in grants}
    sent_by_lease = {}
    for path, body, _ in session.calls:
        if path == "checkin" and body["report"]:
            results = body["report"]["results"]
            sent_by_lease[body["report"]["lease_id"]] = sum(r["status"] == "sent" for r in results)
    for grant in grants:
        lease_marks = marks.get(grant["lease_id"], [])
        steps = [b - a for a, b in zip([0, *lease_marks], lease_marks, strict=False)]
        assert all(0 < step <= 4 for step in steps), (grant["lease_id"], lease_marks)
        # (A batch can be cut short by its window; nothing past the last mark was started.)
        assert sent_by_lease[grant["lease_id"]] <= (lease_marks or [0])[-1]
        assert (lease_marks or [0])[-1] <= len(grant["recipients"])
    # What the server recorded is the last mark of each lease.
    recorded = dict(Lease.objects.values_list("pk", "started_through"))
    assert recorded == {g["lease_id"]: (marks.get(g["lease_id"]) or [0])[-1] for g in grants}


def test_a_send_still_out_is_left_out_of_the_report_and_reported_late(monkeypatch):
    """One slow provider call does not hold its batch: the report goes without it (the server
    marks it unknown) and its outcome goes with the next check-in, as late."""
    from sending.worker import batch as batch_module

    monkeypatch.setattr(batch_module, "STRAGGLER_S", 0.2)
    release = threading.Event()

    class OneSlowSend(RecordingProvider):
        def send(self, **fields):
            if fields["recipient_id"] == 3:
                release.wait(10)
            return super().send(**fields)

    worker, _ = fake_worker(OneSlowSend(send_s=0.01))
    began = time.monotonic()
    _, report = send_now(worker, fake_batch(5, concurrency=5))
    assert time.monotonic() - began < 2
    assert sorted(r["id"] for r in report["results"]) == [1, 2, 4, 5]
    assert worker.summary.unknown == 1
    assert worker.late_reports(limit=20) == []  # still out: nothing to say yet

    release.set()
    wait_for(lambda: all(f.done() for f in worker.stragglers[7]))
    # Not while the lease's own report is undelivered (the check-in would fold it in there).
    assert worker.late_reports(limit=20) == []
    worker.report = None  # the report went with a check-in
    late = worker.late_reports(limit=20)
    assert late == [
        {
            "lease_id": 7,
            "elapsed_ms": 0,
            "results": [
                {
                    "id": 3,
                    "status": "sent",
                    "provider_id": "p-3",
                    "done_ms": late[0]["results"][0]["done_ms"],
                }
            ],
        }
    ]
    assert (worker.summary.sent, worker.summary.unknown) == (5, 0)
    worker.close()


def test_a_send_queued_behind_a_straggler_does_not_start_after_the_report(monkeypatch):
    from sending.worker import batch as batch_module

    monkeypatch.setattr(batch_module, "STRAGGLER_S", 0.2)
    release = threading.Event()

    class SlowFirst(RecordingProvider):
        def send(self, **fields):
            if fields["recipient_id"] == 1:
                release.wait(10)
            return super().send(**fields)

    provider = SlowFirst(send_s=0.01)
    worker, _ = fake_worker(provider)
    # concurrency 2 in a pool of 1 thread: recipient 2 waits behind recipient 1 in the pool.
    worker._pool = batch_module.ThreadPoolExecutor(1)
    worker._pool_size = 2
    _, report = send_now(worker, fake_batch(2, concurrency=2))
    assert report["results"] == []
    release.set()
    wait_for(lambda: all(f.done() for f in worker.stragglers[7]))
    worker.report = None  # the report went with a check-in
    late = worker.late_reports(limit=20)[0]["results"]
    assert [(r["id"], r["status"]) for r in late] == [(1, "sent"), (2, "not_started")]
    assert 2 not in provider.starts
    worker.close()
