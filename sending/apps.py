"""The sending app: messages, recipients and the engine that sends them."""

from django.apps import AppConfig


class SendingConfig(AppConfig):
    name = "sending"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from . import webhooks

        webhooks.connect()
