"""The providers' tracking webhooks, as an adapter: anymail's views (customers/urls.py, behind
its WEBHOOK_SECRET basic auth) parse SES-through-SNS and Postmark posts into normalized events
and send its `tracking` signal; this receiver hands each event to sending.tracking.record."""

from anymail.signals import tracking as tracking_signal

from . import tracking


def on_tracking_event(sender, event, esp_name, **kwargs) -> None:
    tracking.record(event, esp_name=esp_name)


def connect() -> None:
    tracking_signal.connect(on_tracking_event, dispatch_uid="emailops.sending.tracking")
