"""The Celery app, configured from Django's settings (CELERY_*), finding each app's tasks."""

import os

from celery import Celery

from emailops.logs import connect_celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "emailops.settings")

app = Celery("emailops")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
connect_celery(app)
