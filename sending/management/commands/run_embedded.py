"""Run all of EmailOps in one process, with no services: what `make run` starts.

- the ASGI app (admin, worker API, websockets) under uvicorn, in the main thread;
- a real Celery worker (thread pool) and beat, in threads, over Celery's in-memory broker —
  the same tasks production runs on Redis;
- local workers, started by the conductor as threads of this process (WORKER_RUNTIME=local);
- the sandbox provider on SANDBOX_PORT, with each sandbox account's own per-minute cap.

One process is the point: the in-memory broker and channel layer reach every part of it, so the
conductor's live samples reach the websocket consumers without Redis.
"""

import os
import threading

import uvicorn
from celery.beat import EmbeddedService
from celery.worker import WorkController
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from customers.models import ProviderAccount
from emailops.celery import app as celery_app


class Command(BaseCommand):
    help = "Serve EmailOps with its conductor, beat, local workers and the sandbox provider."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--sandbox-port", type=int, default=8025)

    def handle(self, *args, host, port, sandbox_port, **options):
        if settings.REDIS_URL or not celery_app.conf.broker_url.startswith("memory://"):
            raise CommandError(
                "run_embedded is for the no-services mode: unset REDIS_URL, or run the web, "
                "Celery worker and beat processes separately."
            )
        if "WORKER_API_URL" not in os.environ:
            # Local workers call back into this very process, on whatever port it was given.
            settings.WORKER_API_URL = f"http://{host}:{port}/api/worker/v1/"
        sandbox = self._start_sandbox(sandbox_port)
        worker = WorkController(
            app=celery_app,
            hostname="embedded@localhost",
            pool_cls="threads",
            concurrency=4,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        threading.Thread(target=worker.start, name="celery-worker", daemon=True).start()
        # The same database scheduler as production's beat (the CLI reads it from settings; the
        # embedded service must be told).
        beat = EmbeddedService(
            celery_app, thread=True, scheduler_cls=celery_app.conf.beat_scheduler
        )
        beat.start()
        self.stdout.write(
            f"Celery worker and beat running in-process; sandbox provider at {sandbox.url}"
        )
        try:
            uvicorn.run(
                "emailops.asgi:application", host=host, port=port, log_level="info", lifespan="off"
            )
        finally:
            from sending.runtimes import shutdown_local_workers

            beat.stop()
            worker.stop(in_sighandler=False)
            shutdown_local_workers(timeout_s=10)
            sandbox.stop()

    def _start_sandbox(self, port: int):
        from sending.sandbox import SandboxServer

        caps = {}
        for account in ProviderAccount.objects.filter(kind=ProviderAccount.Kind.SANDBOX):
            key = account.credentials.get("api_key")
            if key:
                caps[key] = account.per_minute_cap
        server = SandboxServer(host="127.0.0.1", port=port, caps=caps)
        server.start()
        return server
