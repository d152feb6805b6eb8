"""The sandbox mail provider: a local HTTP server that speaks the subset of Postmark's API we use.

It plays the part of a real provider so that the engine's promises can be measured at the provider
side: it enforces its own per-API-key cap per CALENDAR minute (on its own clock, optionally skewed),
counted when a request arrives, answers 429 past it, records every accepted send, and counts a
repeated idempotency key as a duplicate instead of a new send. It can add latency, inject
faults, and answer late (`late=LateAnswer(fraction, delay_ms)`: accepted and recorded first,
then the answer is held).

    python -m sending.sandbox --port 8025 --cap demo-key=1200 --default-cap 600

In-process: `SandboxServer(port=0, caps={"k": 100}).start()`, then `.url`, `.report()`, `.stop()`.

Modules: books (caps, sends, duplicates, faults), server (HTTP), __main__ (the command).

HTTP: POST /email, POST /email/batch (Postmark's shapes, token in X-Postmark-Server-Token);
GET /_sandbox/report, GET /_sandbox/sends, POST /_sandbox/reset, POST /_sandbox/faults,
POST /_sandbox/caps, POST /_sandbox/late {"fraction": 0.02, "delay_ms": 7000} (accept and record,
then hold the answer).
Standard library only, and quiet unless asked: `make run` may host it in its own process.
"""

from .books import Fault, LateAnswer, Latency, Ledger, Send, idempotency_key, minute_key
from .server import SandboxServer

__all__ = [
    "Fault",
    "LateAnswer",
    "Latency",
    "Ledger",
    "SandboxServer",
    "Send",
    "idempotency_key",
    "minute_key",
]
