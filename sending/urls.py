"""The worker API's URLs (mounted at /api/worker/v1/); view and URL names are its contract."""

from django.urls import path

from . import api

app_name = "worker_api"

urlpatterns = [
    path("checkin", api.checkin, name="checkin"),
    path("progress", api.progress, name="progress"),
    path("openapi.yaml", api.openapi, name="openapi"),
]
