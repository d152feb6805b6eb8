"""The public URLs (mounted at /public/): unsubscribe links and the providers' tracking webhooks.
Nothing here uses a session: mail clients and providers call these without cookies."""

from django.urls import include, path

from . import public

app_name = "public"

urlpatterns = [
    path("unsubscribe/<str:token>/", public.unsubscribe, name="unsubscribe"),
    # anymail's tracking webhooks: amazon_ses/tracking/ and postmark/tracking/, behind
    # ANYMAIL["WEBHOOK_SECRET"] basic auth. Their events reach sending.tracking via the
    # `tracking` signal.
    path("anymail/", include("anymail.urls")),
]
