"""No secret on any admin page: every page reachable from the admin index (each distinct path,
followed link by link as a superuser sees them) is rendered and searched for the provider
credentials, their ciphertext, a worker's token and the site's keys."""

import re
from collections import deque
from urllib.parse import urljoin, urlsplit

import pytest
from django.conf import settings
from django.db import connection

from customers.models import ProviderAccount
from customers.services import provider_account_save
from sending import checkin
from tests.factories import (
    ConductorLeaseFactory,
    CustomerFactory,
    CustomerMinuteFactory,
    LeaseFactory,
    MessageFactory,
    RecipientFactory,
    SuppressionFactory,
    WorkerFactory,
)

pytestmark = pytest.mark.django_db

PASSWORD = "smtp-Pa55word-never-shown"
API_KEY = "pm-api-key-never-shown"
MAX_PAGES = 400


def _links(html: str, base: str) -> set[str]:
    found = set()
    for href in re.findall(r'href="([^"#]+)"', html):
        url = urljoin(base, href.replace("&amp;", "&"))
        path = urlsplit(url).path
        if path.startswith("/admin/") and not path.startswith("/admin/logout"):
            found.add(path)
    return found


@pytest.fixture
def engine_with_secrets():
    smtp = ProviderAccount(
        name="SMTP main",
        kind="smtp",
        settings={"host": "smtp.college.example", "port": 587},
        per_minute_cap=1_000,
    )
    smtp.enter_credentials(credentials={"username": "mailer", "password": PASSWORD})
    provider_account_save(account=smtp)
    smtp.settings = {**smtp.settings, "host": "smtp2.college.example"}
    smtp.enter_credentials(credentials={"username": "mailer", "password": PASSWORD})
    provider_account_save(account=smtp)  # a second history record
    ProviderAccount.objects.create(
        name="By reference",
        kind="postmark",
        credentials_ref="arn:aws:secretsmanager:us-east-1:123456789012:secret:emailops/pm-AbC",
        per_minute_cap=1_000,
    )
    customer = CustomerFactory(provider_account=smtp, per_minute=600)
    message = MessageFactory(customer=customer, status="sending")
    RecipientFactory(message=message, status="sent")
    SuppressionFactory(customer=customer)
    # A row stored before answers were scrubbed: the page must not show it either.
    old = WorkerFactory(
        customer=customer,
        last_response={
            "decision": "send",
            "batch": {"lease_id": 1, "provider": {"credentials": {"api_key": API_KEY}}},
        },
    )
    LeaseFactory(worker=old)
    CustomerMinuteFactory(customer=customer)
    ConductorLeaseFactory(customer=customer)
    _, token = checkin.worker_start(customer_id=customer.pk)
    with connection.cursor() as cursor:
        cursor.execute("SELECT credentials FROM customers_provideraccount WHERE id = %s", [smtp.pk])
        (ciphertext,) = cursor.fetchone()
    return {
        "password": PASSWORD,
        "old answer's key": API_KEY,
        "ciphertext": ciphertext,
        "worker token": token,
        "SECRET_KEY": settings.SECRET_KEY,
        "WORKER_TOKEN_KEY": settings.WORKER_TOKEN_KEY,
        **{f"FIELD_ENCRYPTION_KEY {i}": k for i, k in enumerate(settings.FIELD_ENCRYPTION_KEYS)},
    }


def test_no_admin_page_shows_a_secret(admin_client, engine_with_secrets):
    secrets = engine_with_secrets
    seen, queue, rendered = set(), deque(["/admin/"]), {}
    while queue and len(seen) < MAX_PAGES:
        path = queue.popleft()
        if path in seen:
            continue
        seen.add(path)
        response = admin_client.get(path)
        if response.status_code != 200:
            continue
        body = (
            b"".join(response.streaming_content) if response.streaming else response.content
        ).decode(errors="replace")
        rendered[path] = body
        for name, value in secrets.items():
            assert value not in body, f"{name} shown on {path}"
        if "html" in response.get("Content-Type", ""):
            queue.extend(_links(body, path) - seen)

    # The crawl reached every page family: each model's list, change and history pages, and the
    # custom pages.
    must = [
        "/admin/customers/provideraccount/",
        "/admin/customers/customer/",
        "/admin/customers/sendlimit/",
        "/admin/customers/suppression/",
        "/admin/sending/message/",
        "/admin/sending/recipient/",
        "/admin/sending/worker/",
        "/admin/sending/lease/",
        "/admin/sending/customerminute/",
        "/admin/sending/conductorlease/",
        "/admin/sending/customerminute/live/",
        "/admin/sending/recipient/export/",
    ]
    assert set(must) <= set(rendered), set(must) - set(rendered)
    for family in ("provideraccount", "worker", "customer", "message"):
        kinds = {p.rstrip("/").rsplit("/", 1)[-1] for p in rendered if f"/{family}/" in p}
        assert {"change", "history"} <= kinds, (family, kinds)
    # The provider account's pages say what is configured, never a value.
    account_pages = " ".join(b for p, b in rendered.items() if "/provideraccount/" in p)
    assert "password, username (values hidden)" in account_pages
    assert "By reference: arn:aws:secretsmanager" in account_pages
    assert len(rendered) > 40
