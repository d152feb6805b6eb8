from django.apps import AppConfig


class EmailopsConfig(AppConfig):
    """The project package as an app: its system checks and management commands."""

    name = "emailops"
    verbose_name = "EmailOps"

    def ready(self):
        from emailops import checks  # noqa: F401  (registers them)
