"""The worker's client for the worker API: JSON over HTTP with its bearer token, retried on
network errors and 5xx answers with the same body."""

import logging
import time
from collections.abc import Callable
from urllib.parse import urljoin

import requests

log = logging.getLogger("sending.worker")


class ApiError(Exception):
    """The worker API refused a call (4xx): fatal for this worker, never retried."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class ApiUnavailable(ApiError):
    """Network errors or 5xx answers, still failing after every retry."""


class Api:
    """The worker API over HTTP, with the current token. Retries repeat the same request body."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        timeout_s: float,
        retries: int,
        backoff_ms: int,
        sleep: Callable[[float], None] = time.sleep,
        session: requests.Session | None = None,
    ):
        self.api_url = api_url if api_url.endswith("/") else api_url + "/"
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_ms = backoff_ms
        self.sleep = sleep
        self.session = session or requests.Session()
        self.last_attempts = 0

    def post(self, path: str, body: dict) -> dict | None:
        url = urljoin(self.api_url, path)
        problem = ""
        for attempt in range(self.retries + 1):
            self.last_attempts = attempt + 1
            if attempt:
                delay_s = self.backoff_ms * 2 ** (attempt - 1) / 1000
                log.warning("%s failed (%s); retry %d in %.2f s", path, problem, attempt, delay_s)
                self.sleep(delay_s)
            try:
                response = self.session.post(
                    url,
                    json=body,
                    headers={"Authorization": f"Bearer {self.token}"},
                    timeout=self.timeout_s,
                )
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code >= 500:
                problem = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise ApiError(
                    f"{path}: HTTP {response.status_code}: {response.text[:500]}",
                    status=response.status_code,
                )
            return response.json() if response.content else None
        raise ApiUnavailable(f"{path}: still failing after {self.retries + 1} attempts: {problem}")

    def close(self) -> None:
        self.session.close()
