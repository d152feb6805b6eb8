"""The sandbox over real HTTP: Postmark's answers, calendar-minute caps, duplicates, faults."""

import json
import signal
import statistics
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sending.sandbox import LateAnswer, Latency, SandboxServer, minute_key
from tests.net import free_port

MINUTE = 60_000
T0 = 1_800_000_000_000  # 2027-01-15T08:00:00.000Z, the start of a calendar minute


class Clock:
    """The sandbox's clock, moved by the test."""

    def __init__(self, ms: int):
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def clock():
    return Clock(T0 + 10_000)


@pytest.fixture
def sandbox(clock):
    server = SandboxServer(caps={"key-a": 3}, default_cap=None, clock=clock).start()
    yield server
    server.stop()


def message(n=1, to="ada@example.com", **extra):
    body = {
        "From": "news@college.example",
        "To": to,
        "Subject": f"Hello {n}",
        "TextBody": "Hello",
        "Headers": [{"Name": "X-EmailOps-Idempotency-Key", "Value": str(n)}],
    }
    return {**body, **extra}


def post(server, path, body, key="key-a", session=requests):
    return session.post(
        server.url + path.lstrip("/"),
        data=json.dumps(body),
        headers={"X-Postmark-Server-Token": key, "Content-Type": "application/json"},
        timeout=5,
    )


def test_accepts_a_send_and_answers_like_postmark(sandbox, clock):
    response = post(sandbox, "/email", message(7))

    assert response.status_code == 200
    body = response.json()
    assert body["To"] == "ada@example.com"
    assert body["ErrorCode"] == 0
    assert body["Message"] == "OK"
    assert body["SubmittedAt"] == "2027-01-15T08:00:10.000Z"
    uuid.UUID(body["MessageID"])
    assert response.headers["X-RateLimit-Limit"] == "3"
    assert response.headers["X-RateLimit-Remaining"] == "2"
    [send] = sandbox.sends
    assert (send.arrived_ms, send.api_key, send.idempotency_key) == (T0 + 10_000, "key-a", "7")
    assert send.message_id == body["MessageID"]


@pytest.mark.parametrize("key", ["nobody", ""])
def test_an_unknown_token_gets_401_with_postmark_error_10_and_is_not_recorded(sandbox, key):
    response = post(sandbox, "/email", message(), key=key)

    assert response.status_code == 401
    assert response.json()["ErrorCode"] == 10
    assert sandbox.sends == []


def test_past_the_cap_answers_429_with_rate_limit_headers_and_records_nothing(sandbox, clock):
    for n in (1, 2, 3):
        assert post(sandbox, "/email", message(n)).status_code == 200
    clock.ms = T0 + 45_500
    refused = post(sandbox, "/email", message(4))

    assert refused.status_code == 429
    assert refused.json()["ErrorCode"] == 429
    assert refused.headers["Retry-After"] == "15"
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert refused.headers["X-RateLimit-Reset"] == str((T0 + MINUTE) // 1000)
    assert [s.idempotency_key for s in sandbox.sends] == ["1", "2", "3"]


def test_the_cap_is_per_calendar_minute_and_the_report_counts_each_minute(sandbox, clock):
    clock.ms = T0 + 59_999  # the last millisecond of the minute
    for n in (1, 2, 3):
        post(sandbox, "/email", message(n))
    assert post(sandbox, "/email", message(4)).status_code == 429
    clock.ms = T0 + MINUTE  # the next calendar minute starts with a fresh count
    assert post(sandbox, "/email", message(4)).status_code == 200

    report = requests.get(sandbox.url + "_sandbox/report", timeout=5).json()
    first, second = minute_key(T0), minute_key(T0 + MINUTE)
    assert (first, second) == ("2027-01-15T08:00", "2027-01-15T08:01")
    assert report["per_minute"] == {"key-a": {first: 3, second: 1}}
    assert report["total"] == {"key-a": 4}
    assert report["throttled"] == {"key-a": {first: 1}}
    assert report["over_cap_minutes"] == {"key-a": {first: 4}}
    assert report["duplicates"] == {}


def test_the_clock_offset_moves_arrivals_across_a_minute_boundary(clock):
    clock.ms = T0 + 59_900
    with SandboxServer(caps={"k": 10}, clock=clock, clock_offset_ms=200) as sandbox:
        post(sandbox, "/email", message(), key="k")
        report = sandbox.report()

    assert report["per_minute"] == {"k": {minute_key(T0 + MINUTE): 1}}
    assert sandbox.sends[0].arrived_ms == T0 + 60_100


def test_default_cap_admits_other_keys_each_with_its_own_count(clock):
    with SandboxServer(caps={"big": 100}, default_cap=1, clock=clock) as sandbox:
        assert post(sandbox, "/email", message(1), key="x").status_code == 200
        assert post(sandbox, "/email", message(2), key="x").status_code == 429
        assert post(sandbox, "/email", message(3), key="y").status_code == 200
        assert post(sandbox, "/email", message(4), key="big").status_code == 200
        assert post(sandbox, "/email", message(5), key="big").status_code == 200
        report = sandbox.report()

    minute = minute_key(clock.ms)
    assert report["per_minute"] == {"x": {minute: 1}, "y": {minute: 1}, "big": {minute: 2}}


def test_a_repeated_idempotency_key_is_a_duplicate_not_a_new_send(sandbox):
    metadata_only = message(9, Headers=[], Metadata={"emailops_recipient_id": "5"})
    answers = [
        post(sandbox, "/email", message(5)),
        post(sandbox, "/email", metadata_only),  # the same key, carried in Metadata
        post(sandbox, "/email", message(6)),
    ]

    assert [a.status_code for a in answers] == [200, 200, 200]
    report = sandbox.report()
    assert report["total"] == {"key-a": 2}
    assert report["duplicates"] == {"key-a": 1}
    # The provider still saw three requests: the cap counts them all.
    assert post(sandbox, "/email", message(7)).status_code == 429
    assert [s.duplicate for s in sandbox.sends] == [False, True, False]


def test_a_batch_is_recorded_per_message_and_refused_whole_past_the_cap(sandbox):
    answer = post(sandbox, "/email/batch", [message(1), message(2, to="bo@example.com")])
    assert answer.status_code == 200
    assert [r["To"] for r in answer.json()] == ["ada@example.com", "bo@example.com"]

    refused = post(sandbox, "/email/batch", [message(3), message(4)])
    assert refused.status_code == 429
    assert [s.idempotency_key for s in sandbox.sends] == ["1", "2"]


@pytest.mark.parametrize(
    ("body", "status", "error_code"),
    [
        ("{not json", 400, 402),
        ({"From": "a@example.com", "Subject": "no To"}, 422, 300),
        ([], 422, 410),
    ],
)
def test_a_malformed_request_gets_postmarks_error_and_is_not_recorded(
    sandbox, body, status, error_code
):
    data = body if isinstance(body, str) else json.dumps(body)
    path = "email/batch" if isinstance(body, list) else "email"
    answer = requests.post(
        sandbox.url + path, data=data, headers={"X-Postmark-Server-Token": "key-a"}, timeout=5
    )
    assert answer.status_code == status
    assert answer.json()["ErrorCode"] == error_code
    assert sandbox.sends == []


def test_injected_faults_answer_instead_of_sending(sandbox, clock):
    sandbox.inject_fault(500, count=2)
    statuses = [post(sandbox, "/email", message(n)).status_code for n in (1, 2, 3)]
    assert statuses == [500, 500, 200]

    sandbox.inject_fault(429, duration_ms=1_000)
    assert post(sandbox, "/email", message(4)).status_code == 429
    clock.ms += 1_000
    assert post(sandbox, "/email", message(4)).status_code == 200

    assert [s.idempotency_key for s in sandbox.sends] == ["3", "4"]
    assert sandbox.report()["faults"] == {"500": 2, "429": 1}


def test_a_fault_fraction_hits_about_that_share_of_requests(clock):
    with SandboxServer(caps={"k": 1000}, clock=clock) as sandbox:
        sandbox.inject_fault(503, fraction=0.5)
        with requests.Session() as session:
            statuses = [
                post(sandbox, "/email", message(n), key="k", session=session).status_code
                for n in range(100)
            ]
    assert set(statuses) == {200, 503}
    assert 20 < statuses.count(503) < 80  # 0.5 ± 6 standard deviations


def test_faults_and_caps_can_be_set_and_everything_reset_over_http(sandbox):
    requests.post(sandbox.url + "_sandbox/caps", json={"key-c": 1}, timeout=5)
    requests.post(sandbox.url + "_sandbox/faults", json={"status": 500, "count": 1}, timeout=5)
    assert post(sandbox, "/email", message(1), key="key-c").status_code == 500
    assert post(sandbox, "/email", message(1), key="key-c").status_code == 200
    assert post(sandbox, "/email", message(2), key="key-c").status_code == 429

    assert requests.post(sandbox.url + "_sandbox/reset", timeout=5).status_code == 200
    report = sandbox.report()
    assert (report["per_minute"], report["throttled"], report["faults"]) == ({}, {}, {})
    assert sandbox.sends == []
    assert post(sandbox, "/email", message(1), key="key-c").status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [("_sandbox/faults", {"status": 200}), ("_sandbox/faults", {"when": 1}), ("_sandbox/caps", [])],
)
def test_a_bad_control_request_gets_400_and_changes_nothing(sandbox, path, body):
    answer = requests.post(sandbox.url + path, json=body, timeout=5)
    assert answer.status_code == 400
    assert sandbox.ledger.faults == []
    assert sandbox.ledger.caps == {"key-a": 3}


def test_latency_is_lognormal_with_the_given_median_and_p99():
    latency = Latency(median_ms=40, p99_ms=200)
    samples = sorted(latency.sample_s() * 1000 for _ in range(20_000))
    assert statistics.median(samples) == pytest.approx(40, rel=0.1)
    assert samples[int(0.99 * len(samples))] == pytest.approx(200, rel=0.2)
    assert Latency().sample_s() == 0


def test_many_concurrent_keep_alive_clients_are_all_recorded(clock):
    with SandboxServer(caps={"k": 10_000}, clock=clock) as sandbox:

        def client(c):
            with requests.Session() as session:
                return [
                    post(sandbox, "/email", message(c * 100 + n), key="k", session=session)
                    for n in range(10)
                ]

        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = [a for batch in pool.map(client, range(20)) for a in batch]
        connections = sandbox.connections_opened

    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["MessageID"] for a in answers}) == 200
    assert sandbox.report()["total"] == {"k": 200}
    assert connections == 20  # one per client session, reused for its ten requests


def test_cli_serves_until_interrupted_and_prints_its_report():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sending.sandbox", "--port", str(port), "--cap", "demo-key=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in banner
        url = f"http://127.0.0.1:{port}/email"
        headers = {"X-Postmark-Server-Token": "demo-key"}
        assert requests.post(url, json=message(1), headers=headers, timeout=5).status_code == 200
        assert requests.post(url, json=message(2), headers=headers, timeout=5).status_code == 429
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0
    assert err == ""  # quiet: no request log
    report = json.loads(out.strip().splitlines()[-1])["report"]
    assert sum(report["total"].values()) == 1


def test_cli_needs_a_cap():
    result = subprocess.run(
        [sys.executable, "-m", "sending.sandbox", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 2
    assert "--cap" in result.stderr


def test_a_late_answer_is_recorded_before_it_is_held_so_a_client_that_gives_up_sent_it(clock):
    with SandboxServer(caps={"k": 10}, clock=clock, late=LateAnswer(1.0, 1_500)) as sandbox:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(
                sandbox.url + "email",
                data=json.dumps(message(1)),
                headers={"X-Postmark-Server-Token": "k"},
                timeout=0.3,
            )
        # Recorded at arrival, while the answer is still being held.
        assert [s.idempotency_key for s in sandbox.sends] == ["1"]
        assert sandbox.report()["late"] == {"k": 1}
        # Turned off over HTTP: answers come at once again.
        off = requests.post(sandbox.url + "_sandbox/late", json={"fraction": 0}, timeout=5)
        assert off.status_code == 200
        assert post(sandbox, "/email", message(2), key="k").status_code == 200
    assert sandbox.report()["late"] == {"k": 1}


def test_the_late_knob_holds_about_its_fraction_of_answers_for_its_delay(clock):
    with SandboxServer(caps={"k": 1000}, clock=clock) as sandbox:
        answer = requests.post(
            sandbox.url + "_sandbox/late", json={"fraction": 0.5, "delay_ms": 400}, timeout=5
        )
        assert answer.status_code == 200
        assert sandbox.late == LateAnswer(0.5, 400)
        with requests.Session() as session:
            for n in range(40):
                assert post(sandbox, "/email", message(n), key="k", session=session).ok
    late = sandbox.report()["late"]["k"]
    assert 5 < late < 35  # 0.5 of 40 ± 4.7 standard deviations
    assert len(sandbox.sends) == 40


@pytest.mark.parametrize(
    "body", [{"fraction": 2}, {"fraction": -0.1}, {"delay_ms": -1}, {"fraction": "x"}, {"x": 1}]
)
def test_a_bad_late_request_gets_400_and_changes_nothing(sandbox, body):
    answer = requests.post(sandbox.url + "_sandbox/late", json=body, timeout=5)
    assert answer.status_code == 400
    assert sandbox.late == LateAnswer()


def test_reset_turns_late_answers_off(sandbox):
    sandbox.set_late(1.0, 5_000)
    sandbox.reset()
    assert sandbox.late.hold_s() == 0
