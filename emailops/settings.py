"""EmailOps settings: one module, configured from environment variables.

DEBUG is off unless set: a deploy that forgets it gets production's behaviour (secrets required,
strict security settings), never generated keys. `make run` and the tests set DEBUG=true
explicitly; with it, unset means the embedded default: a SQLite file, no Redis, local workers, the
sandbox provider, development secrets generated once under var/. Production sets the variables
listed in README.md (and .env.example).
"""

from pathlib import Path

import environ
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured
from django.core.management.utils import get_random_secret_key

from emailops.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

# Local state of the embedded mode (SQLite file, generated development secrets): never committed.
VAR_DIR = Path(env.str("EMAILOPS_VAR_DIR", default=str(BASE_DIR / "var")))

DEBUG = env.bool("DEBUG", default=False)


def _local_secret(name: str, make) -> str:
    """A development-only secret, generated once and kept in an ignored file under var/."""
    path = VAR_DIR / name
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


def _required_in_production(name: str, make) -> str:
    value = env.str(name, default="")
    if value:
        return value
    if not DEBUG:
        raise ImproperlyConfigured(f"{name} must be set when DEBUG is off.")
    return _local_secret(name.lower(), make)


SECRET_KEY = _required_in_production("SECRET_KEY", get_random_secret_key)
# Previous keys, still accepted when reading signed values (sessions) during a rotation: see
# docs/runbook.md.
SECRET_KEY_FALLBACKS = env.list("SECRET_KEY_FALLBACKS", default=[])
# Comma-separated Fernet keys for provider credentials; the first encrypts, all decrypt (rotation).
FIELD_ENCRYPTION_KEYS = _required_in_production(
    "FIELD_ENCRYPTION_KEY", lambda: Fernet.generate_key().decode()
).split(",")

# Worker tokens are signed with a key of their own, not SECRET_KEY: rotating one never silently
# breaks the other. WORKER_TOKEN_KEY_FALLBACKS are previous keys, still accepted while rotating.
# In production a missing key is a system check error (emailops.E005) and no token is minted.
WORKER_TOKEN_KEY = env.str("WORKER_TOKEN_KEY", default="") or (
    _local_secret("worker_token_key", get_random_secret_key) if DEBUG else ""
)
WORKER_TOKEN_KEY_FALLBACKS = env.list("WORKER_TOKEN_KEY_FALLBACKS", default=[])
# One-click unsubscribe links (customers.unsubscribe) are signed with a key of their own, not
# SECRET_KEY: rotating that must not break links already in inboxes. They never expire.
UNSUBSCRIBE_KEY = _required_in_production("UNSUBSCRIBE_KEY", get_random_secret_key)
# The site's address as recipients' mail clients reach it (https in production): unsubscribe
# links start with it. UNSUBSCRIBE_MAILTO (optional) is offered beside the https link.
PUBLIC_BASE_URL = env.str("PUBLIC_BASE_URL", default="http://127.0.0.1:8000")
UNSUBSCRIBE_MAILTO = env.str("UNSUBSCRIBE_MAILTO", default="")
# Provider tracking webhooks (django-anymail, mounted under /public/anymail/) require HTTP basic
# auth with this "user:password": providers are configured with it in the webhook URL.
ANYMAIL = {
    "WEBHOOK_SECRET": _required_in_production(
        "ANYMAIL_WEBHOOK_SECRET", lambda: f"emailops:{get_random_secret_key()}"
    ),
}

# The sending-domain check (customers.domain_check): the system's resolvers unless DNS_NAMESERVERS
# names some ("10.0.0.2, 10.0.0.3"), asked on DNS_PORT; each lookup gives up after DNS_TIMEOUT_S.
DNS_NAMESERVERS = env.list("DNS_NAMESERVERS", default=[])
DNS_PORT = env.int("DNS_PORT", default=53)
DNS_TIMEOUT_S = env.float("DNS_TIMEOUT_S", default=3)

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "simple_history",
    "django_celery_beat",
    "csp",
    "anymail",
    "channels",
    "emailops",
    "customers",
    "sending",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "emailops.middleware.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "simple_history.middleware.HistoryRequestMiddleware",
]

ROOT_URLCONF = "emailops.urls"
ASGI_APPLICATION = "emailops.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'emailops.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the admin read while a worker writes; IMMEDIATE makes writers queue instead of
    # failing with "database is locked" when they upgrade a read lock.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"init_command": "PRAGMA journal_mode=WAL;", "transaction_mode": "IMMEDIATE", "timeout": 30}
    )
else:
    # On ECS the password comes from Secrets Manager on its own, and DATABASE_URL carries none.
    if env.str("DATABASE_PASSWORD", default=""):
        DATABASES["default"]["PASSWORD"] = env.str("DATABASE_PASSWORD")
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # Short statements only: JIT compiling costs hundreds of milliseconds when a stale row
    # estimate pushes a check-in's plan over jit_above_cost, and never pays back here.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("options", "-c jit=off")
    # The worker API's hot statements are prepared on their connection (sending/prepared.py):
    # psycopg prepares none while this is None (Django's default). Django's own cursors bind on
    # the client, and psycopg never prepares for those. Off for a connection pooler in
    # transaction mode that does not track prepared statements.
    if env.bool("DATABASE_PREPARED_STATEMENTS", default=True):
        DATABASES["default"]["OPTIONS"].setdefault("prepare_threshold", 5)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Where `collectstatic` puts files for production; in development they are served from where
# they are, so there is no such folder to look in.
STATIC_ROOT = env.str("STATIC_ROOT", default="") or (
    None if DEBUG else str(BASE_DIR / "staticfiles")
)
STATICFILES_DIRS = [BASE_DIR / "static"]
# WhiteNoise serves static files from the app process itself (one container, no CDN); in
# development it finds them where they are, in production from `collectstatic` output.
WHITENOISE_USE_FINDERS = DEBUG

REDIS_URL = env.str("REDIS_URL", default="")

if REDIS_URL:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # A consumer waits for messages with a blocking pop of up to 5 s (channels_redis's
            # brpop_timeout); redis-py's default read timeout is also 5 s, so an idle page's
            # wait would end in a TimeoutError and close its socket: reads get longer. And
            # redis-py's pool refuses a 101st connection in use at once (MaxConnectionsError),
            # which a hundred pages (re)connecting together reach.
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": 15, "max_connections": 1000}]
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Celery: Redis in production; without REDIS_URL, an in-memory broker (the embedded mode runs
# the conductor in the same process as the web server).
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Celery's worker and beat log through Django's LOGGING (plain or JSON, with the ids), not a
# root handler of their own.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Personal data: merge data and addresses of a completed message are purged after this many days
# by `manage.py purge_personal_data`.
RECIPIENT_DATA_RETENTION_DAYS = env.int("RECIPIENT_DATA_RETENTION_DAYS", default=90)
# Largest recipient CSV accepted by the admin import.
RECIPIENT_IMPORT_MAX_BYTES = env.int("RECIPIENT_IMPORT_MAX_BYTES", default=50 * 1024 * 1024)

# Sending engine.
# The provider's counting window: 60 s in production; tests use short windows.
SEND_WINDOW_MS = env.int("SEND_WINDOW_MS", default=60_000)
# A worker's per-send provider timeout: after this long past a minute's end nothing started in
# that minute can still arrive, so its open leases stop being charged to the next minute.
SEND_TIMEOUT_MS = env.int("SEND_TIMEOUT_MS", default=5_000)
# Seconds a worker token lives; refreshed at every check-in.
WORKER_TOKEN_MAX_AGE = env.int("WORKER_TOKEN_MAX_AGE", default=300)
# Temporary provider failures are retried this many times before a recipient is marked failed.
SEND_MAX_ATTEMPTS = env.int("SEND_MAX_ATTEMPTS", default=3)

# Workers: "local" (threads or processes on this machine, the embedded default) or "lambda".
WORKER_RUNTIME = env.str("WORKER_RUNTIME", default="local")
LOCAL_WORKER_MODE = env.str("LOCAL_WORKER_MODE", default="thread")
LOCAL_WORKER_TIMEOUT_S = env.float("LOCAL_WORKER_TIMEOUT_S", default=60)
WORKER_API_URL = env.str("WORKER_API_URL", default="http://127.0.0.1:8000/api/worker/v1/")
LAMBDA_FUNCTION_NAME = env.str("LAMBDA_FUNCTION_NAME", default="emailops-worker")
# The worker function's reserved concurrency, when it has one: `make deploy` sets it on the
# function, and `manage.py check --database default` warns when the active customers'
# max_workers add up to more.
LAMBDA_RESERVED_CONCURRENCY = env.int("LAMBDA_RESERVED_CONCURRENCY", default=None)
AWS_REGION = env.str("AWS_REGION", default="us-east-1")
# Conductor: one tick per customer about every CONDUCTOR_TICK_MS; a chain that stops renewing its
# lease for CONDUCTOR_LEASE_S is replaced by the watchdog (run by beat every WATCHDOG_S).
CONDUCTOR_TICK_MS = env.int("CONDUCTOR_TICK_MS", default=500)
CONDUCTOR_LEASE_S = env.float("CONDUCTOR_LEASE_S", default=5)
# Customers are conducted in this many shards, one Celery chain each (sending/shards.py): the
# unit the Celery worker processes share. More shards: more chains to spread, fewer customers a
# round.
CONDUCTOR_SHARDS = env.int("CONDUCTOR_SHARDS", default=8)
WATCHDOG_S = env.float("WATCHDOG_S", default=2)
# On (the default), the watchdog also hands scheduled messages due before its next run to Celery
# for their exact time (sending/scheduling.py); off, they start at the first watchdog run after
# their time, up to WATCHDOG_S late (docs/benchmarks.md, bench.schedule).
SCHEDULE_HANDOVER = env.bool("SCHEDULE_HANDOVER", default=True)
# A tick starts at most this many workers (the rest follow on later ticks).
CONDUCTOR_MAX_STARTS_PER_TICK = env.int("CONDUCTOR_MAX_STARTS_PER_TICK", default=3)
# A worker that has not checked in this long after it was started is lost.
WORKER_START_TIMEOUT_S = env.float("WORKER_START_TIMEOUT_S", default=60)
# How long a worker takes from invocation to its first check-in (a cold start included): this
# close to the next minute, a worker is started even if this minute's budget is spent.
WORKER_WARMUP_MS = env.int("WORKER_WARMUP_MS", default=3_000)
CELERY_BEAT_SCHEDULE = {
    "watchdog": {"task": "sending.tasks.watchdog", "schedule": WATCHDOG_S},
}
# The container gets 120 s (Fargate's maximum stop timeout) to stop. The conductor role turns
# SIGTERM into Celery's soft shutdown (REMAP_SIGTERM=SIGQUIT): when a tick is running, Celery waits
# this long (the whole of it, not until the tick ends), then requeues what still runs (acks_late;
# ticks are idempotent) and exits. Ticks take well under a second.
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = env.float("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", default=10)

# Security. Defaults are strict when DEBUG is off; each can be relaxed by its variable.
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=not DEBUG)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=not DEBUG)
if env.bool("BEHIND_TLS_PROXY", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Content-Security-Policy (django-csp) on every page of the site: scripts and styles from our own
# static files only, no inline script or style anywhere (the admin's own templates have none; ours
# keep theirs in static/emailops/). Websockets go to the same origin ('self'). The message page's
# HTML preview is a response of its own with its own policy (MessageAdmin.preview_view).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "frame-src": ["'self'"],
        "frame-ancestors": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
    },
}

# Alerts (sending.alerts): also mailed to ADMINS when set, at most once per ALERT_REPEAT_S per
# alert kind and customer. ADMINS: "Name <address>, …".
ADMINS = [
    (address.split("<")[0].strip(), address.split("<")[-1].rstrip(">").strip())
    for address in env.list("ADMINS", default=[])
]
ALERT_MAIL_ADMINS = env.bool("ALERT_MAIL_ADMINS", default=bool(ADMINS))
ALERT_REPEAT_S = env.float("ALERT_REPEAT_S", default=600)
# Live pages: how often a websocket re-checks its user's permissions (a user logged out or
# demoted is disconnected within this).
LIVE_PERMISSION_RECHECK_S = env.float("LIVE_PERMISSION_RECHECK_S", default=5)

# LOG_FORMAT=json for production (one JSON object a line, with the customer, message, worker and
# lease ids a line is about: see emailops/logs.py); plain for a terminal.
LOG_FORMAT = env.str("LOG_FORMAT", default="plain")
LOGGING = logging_config(
    fmt=LOG_FORMAT,
    level=env.str("LOG_LEVEL", default="INFO"),
    task_level=env.str("CELERY_TASK_LOG_LEVEL", default="WARNING"),
)
