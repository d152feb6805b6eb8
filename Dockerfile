# syntax=docker/dockerfile:1
# EmailOps: one image, a role per container (web, conductor, beat, migrate, worker; see
# emailops/entrypoint.py). Any base with Python 3.11 and `venv` works: the app lives in a
# virtualenv. deploy/local-image.sh builds it from a Debian base made with mmdebstrap.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

FROM ${BASE_IMAGE} AS build
# pip's own knobs, for a mirror or a wheelhouse bind-mounted into the build (no credentials here:
# build arguments are kept in the image's history).
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
COPY requirements.txt /app/requirements.txt
RUN /opt/venv/bin/pip install --only-binary=:all: -r /app/requirements.txt
COPY . /app
WORKDIR /app
# Static files for WhiteNoise. Settings refuse to load without secrets when DEBUG is off; these
# placeholders exist only for this command and are no secrets of any deployment.
RUN DEBUG=false SECRET_KEY=collectstatic-build-placeholder \
    FIELD_ENCRYPTION_KEY=Y29sbGVjdHN0YXRpYy1idWlsZC1wbGFjZWhvbGRlciE= \
    UNSUBSCRIBE_KEY=collectstatic-build-placeholder ANYMAIL_WEBHOOK_SECRET=build:placeholder \
    STATIC_ROOT=/app/staticfiles /opt/venv/bin/python manage.py collectstatic --noinput -v 0 \
 && /opt/venv/bin/python -m compileall -q /app /opt/venv/lib

FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin emailops
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=emailops.settings \
    DEBUG=false \
    STATIC_ROOT=/app/staticfiles \
    LOG_FORMAT=json \
    PORT=8000
# The app's files stay root's: the process can read them, not change them.
USER 10001
EXPOSE 8000
# Docker and podman run this; ECS runs the task definition's own check (the same command).
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-m", "emailops.entrypoint", "healthcheck"]
ENTRYPOINT ["/opt/venv/bin/python", "-m", "emailops.entrypoint"]
CMD ["web"]
