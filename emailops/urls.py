from django.contrib import admin
from django.urls import path

admin.site.site_header = "EmailOps"
admin.site.site_title = "EmailOps"
admin.site.index_title = "Customers, messages and sends"

urlpatterns = [
    path("admin/", admin.site.urls),
]
