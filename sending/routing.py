"""Websocket routes of the live pages (served by emailops.asgi, staff only)."""

from django.urls import path

from . import consumers

websocket_urlpatterns = [
    path("ws/live/overview/", consumers.OverviewConsumer.as_asgi()),
    path("ws/live/customer/<int:customer_id>/", consumers.CustomerLiveConsumer.as_asgi()),
]
