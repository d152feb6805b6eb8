"""The site's URLs: the admin, the worker API, and the public pages (unsubscribe links and
provider webhooks, reached without a session)."""

from django.contrib import admin
from django.urls import include, path

admin.site.site_header = "EmailOps"
admin.site.site_title = "EmailOps"
admin.site.index_title = "Customers, messages and sends"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/worker/v1/", include("sending.urls")),
    path("public/", include("customers.urls")),
]
