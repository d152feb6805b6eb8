"""The check-in body parser: its fast path for well-formed results must accept exactly what the
full checks accept, and return the same thing."""

from hypothesis import example, given
from hypothesis import strategies as st

from sending import wire

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([2**63 - 1, 2**63, 2**64]),
    st.floats(allow_nan=False, min_value=-1, max_value=2),
    st.sampled_from(["", "sent", "failed", "throttled", "not_started", "unknown", "x" * 256]),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=1),
)
results = st.one_of(
    st.dictionaries(
        st.sampled_from(["id", "status", "provider_id", "error", "permanent", "done_ms"]),
        values,
    ),
    values,
)


@given(results)
@example({"id": 1, "status": "sent", "provider_id": "p", "done_ms": 0})
@example({"id": 1, "status": "failed", "permanent": False, "error": "e", "done_ms": 3})
@example({"id": True, "status": "sent", "provider_id": "p", "done_ms": 0})
@example({"id": 1, "status": "sent", "provider_id": "", "done_ms": 0})
@example({"id": 1, "status": "failed", "error": "e"})
@example({"id": 1, "status": "unknown", "done_ms": 1.5})
def test_fast_path_agrees_with_the_full_checks(raw):
    fast_problems: list[str] = []
    full_problems: list[str] = []
    fast = wire._result(raw, 0, fast_problems)
    full = wire._result_checked(raw, 0, full_problems)
    assert fast == full
    assert fast_problems == full_problems
    assert (fast is None) == bool(full_problems)


def test_a_well_formed_report_parses_to_typed_results():
    request = wire.parse_checkin(
        {
            "worker_id": 1,
            "seq": 2,
            "request_id": "r",
            "report": {
                "lease_id": 3,
                "elapsed_ms": 40,
                "results": [
                    {"id": 7, "status": "sent", "provider_id": "p-7", "done_ms": 12},
                    {"id": 8, "status": "failed", "permanent": True, "error": "550", "done_ms": 9},
                    {"id": 9, "status": "not_started"},
                ],
            },
        }
    )
    assert request.report.results == (
        wire.Result(7, wire.Outcome.SENT, "p-7", False, "", 12),
        wire.Result(8, wire.Outcome.FAILED, "", True, "550", 9),
        wire.Result(9, wire.Outcome.NOT_STARTED),
    )
