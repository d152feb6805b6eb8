"""Every admin page works under the site's Content-Security-Policy (no inline script or style):
Chromium reports anything the policy blocks on the console, and `browse` fails the test on it."""

import contextlib

from django.contrib import admin
from django.urls import NoReverseMatch, reverse

from sending.models import Message
from tests.customers.test_admin_pages import MAKERS
from tests.factories import RecipientFactory


def _pages() -> list[str]:
    urls = [reverse("admin:index"), reverse("admin:sending_live_overview")]
    for model in sorted(admin.site._registry, key=lambda m: m._meta.label):
        name = f"admin:{model._meta.app_label}_{model._meta.model_name}"
        urls.append(reverse(f"{name}_changelist"))
        if admin.site._registry[model].has_add_permission(_superuser_request()):
            urls.append(reverse(f"{name}_add"))
        obj = MAKERS[model._meta.label]()
        urls.append(reverse(f"{name}_change", args=[obj.pk]))
        with contextlib.suppress(NoReverseMatch):
            urls.append(reverse(f"{name}_history", args=[obj.pk]))
    message = Message.objects.first()
    RecipientFactory(message=message)
    urls += [
        reverse("admin:sending_message_import", args=[message.pk]),
        reverse("admin:sending_live_customer", args=[message.customer_id]),
    ]
    return urls


def _superuser_request():
    from django.test import RequestFactory

    from tests.factories import SuperUserFactory

    request = RequestFactory().get("/")
    request.user = SuperUserFactory(username="csp-checker")
    return request


def test_every_admin_page_loads_under_the_policy_without_inline_code(browse, superuser):
    pages = _pages()
    with browse(superuser) as page:
        where = []
        page.on(
            "console",
            lambda message: (
                where.append(page.url) if "Content Security Policy" in message.text else None
            ),
        )
        for url in pages:
            response = page.goto(url)
            assert response.ok, (url, response.status)
            policy = response.headers["content-security-policy"]
            assert "default-src 'self'" in policy, url
            assert "'unsafe-inline'" not in policy.split("style-src-attr")[0], url
            page.wait_for_load_state("load")
        assert not where, f"blocked on {sorted(set(where))}"
    assert len(pages) > 30
