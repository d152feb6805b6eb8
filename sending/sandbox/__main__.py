"""`python -m sending.sandbox`: serve the sandbox in the foreground until interrupted."""

import argparse
import contextlib
import json
import sys

from .books import LateAnswer, Latency
from .server import SandboxServer


def _cap_arg(value: str) -> tuple[str, int]:
    key, sep, cap = value.partition("=")
    if not key or not sep or not cap.isdigit() or int(cap) < 1:
        raise argparse.ArgumentTypeError(f"expected KEY=N with N ≥ 1, got {value!r}")
    return key, int(cap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sending.sandbox",
        description="A local mail provider speaking Postmark's API, with per-minute caps.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument(
        "--cap", type=_cap_arg, action="append", default=[], metavar="KEY=N",
        help="an API key and its cap per calendar minute (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--default-cap", type=int, default=None, metavar="N",
        help="accept any other key, with this cap (default: unknown keys get 401)",
    )  # fmt: skip
    parser.add_argument("--clock-offset-ms", type=int, default=0, help="skew the sandbox clock")
    parser.add_argument("--latency-median-ms", type=float, default=0.0)
    parser.add_argument("--latency-p99-ms", type=float, default=0.0)
    parser.add_argument(
        "--fault", action="append", default=[], metavar="STATUS:FRACTION",
        help="answer STATUS (429, 500, 502, 503) to this fraction of requests, e.g. 500:0.01",
    )  # fmt: skip
    parser.add_argument(
        "--late", default=None, metavar="FRACTION:DELAY_MS",
        help="accept and record, then hold the answer to this fraction of requests, e.g. 0.02:7000",
    )  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    if not args.cap and args.default_cap is None:
        parser.error("give at least one --cap KEY=N or a --default-cap N")

    late = None
    if args.late:
        fraction, _, delay_ms = args.late.partition(":")
        try:
            late = LateAnswer(float(fraction), int(delay_ms or 0))
        except ValueError as exc:
            parser.error(f"--late: {exc}")
    server = SandboxServer(
        args.host,
        args.port,
        caps=dict(args.cap),
        default_cap=args.default_cap,
        clock_offset_ms=args.clock_offset_ms,
        latency=Latency(args.latency_median_ms, args.latency_p99_ms),
        late=late,
        verbose=args.verbose,
    )
    for spec in args.fault:
        status, _, fraction = spec.partition(":")
        server.inject_fault(int(status), fraction=float(fraction or 1))
    server.bind()
    caps = ", ".join(f"{k}={v}/min" for k, v in args.cap) or "none"
    print(
        f"sandbox listening on {server.url} (caps: {caps}; default cap: {args.default_cap}); "
        f"report at {server.url}_sandbox/report",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    print(json.dumps({"report": server.report()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
