"""The public URLs (mounted at /public/): unsubscribe links and the providers' tracking webhooks.
Nothing here uses a session: mail clients and providers call these without cookies."""

from anymail.webhooks.amazon_ses import AmazonSESTrackingWebhookView
from anymail.webhooks.postmark import PostmarkTrackingWebhookView
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from . import public

app_name = "public"

urlpatterns = [
    path("unsubscribe/<str:token>/", public.unsubscribe, name="unsubscribe"),
    # anymail's tracking webhooks, at anymail's own paths, behind ANYMAIL["WEBHOOK_SECRET"]
    # basic auth. Their events reach sending.tracking via the `tracking` signal.
    path(
        "anymail/amazon_ses/tracking/",
        csrf_exempt(public.pooled(AmazonSESTrackingWebhookView.as_view())),
        name="amazon_ses_tracking_webhook",
    ),
    path(
        "anymail/postmark/tracking/",
        csrf_exempt(public.pooled(PostmarkTrackingWebhookView.as_view())),
        name="postmark_tracking_webhook",
    ),
]
