"""Signing in through the admin's login form."""

from playwright.sync_api import expect

from tests.factories import PASSWORD


def sign_in(page, username: str, password: str) -> None:
    page.goto("/admin/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_a_staff_member_signs_in_and_sees_what_their_group_may_use(browse, support_user):
    with browse() as page:
        sign_in(page, "support", PASSWORD)

        expect(page.locator("#user-tools")).to_contain_text("Welcome, support.")
        expect(page.get_by_role("heading", name="Customers, messages and sends")).to_be_visible()
        expect(page.get_by_role("link", name="Messages", exact=True)).to_be_visible()
        # Support does not manage staff.
        expect(page.get_by_role("link", name="Users", exact=True)).to_have_count(0)


def test_a_wrong_password_is_refused_with_a_message(browse, support_user):
    with browse() as page:
        sign_in(page, "support", "not the password")

        expect(page.locator(".errornote")).to_contain_text(
            "Please enter the correct username and password for a staff account."
        )
        expect(page).to_have_url("/admin/login/?next=/admin/")
        page.goto("/admin/")
        expect(page.get_by_role("button", name="Log in")).to_be_visible()
