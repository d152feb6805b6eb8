"""The site's URLs: the admin and the worker API."""

from django.contrib import admin
from django.urls import include, path

admin.site.site_header = "EmailOps"
admin.site.site_title = "EmailOps"
admin.site.index_title = "Customers, messages and sends"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/worker/v1/", include("sending.urls")),
]
