"""`manage.py healthcheck`: the /healthz checks from the command line (exit 1 when failing), for
containers that serve no HTTP and for an operator's shell."""

import json

from django.core.management.base import BaseCommand, CommandError

from emailops import health


class Command(BaseCommand):
    help = "Check that the database and Redis (when configured) answer; exit 1 if not."

    def handle(self, *args, **options):
        status, body = health.report()
        self.stdout.write(json.dumps(body))
        if status != 200:
            raise CommandError(
                "unhealthy: "
                + ", ".join(
                    f"{name}: {result}" for name, result in body["checks"].items() if result != "ok"
                )
            )
