"""Importing recipients from a CSV file, through the message page's "Import recipients" link."""

from django.urls import reverse
from playwright.sync_api import Page, expect

from tests.factories import MessageFactory

GOOD = b"""email,first_name
ada@example.edu,Ada
grace@example.edu,Grace
alan@example.edu,Alan
ADA@example.edu,Ada again
"""
BAD = b"""email,first_name
ada@example.edu,Ada
not-an-address,Nobody
grace@example.edu,Grace
@example.edu,Nobody either
"""


def upload(page: Page, message, name: str, content: bytes) -> None:
    page.goto(reverse("admin:sending_message_change", args=[message.pk]))
    page.locator(".object-tools").get_by_role("link", name="Import recipients").click()
    expect(page.get_by_role("heading", name="Import recipients")).to_be_visible()
    page.get_by_label("CSV file").set_input_files(
        files=[{"name": name, "mimeType": "text/csv", "buffer": content}]
    )
    page.get_by_role("button", name="Import").click()


def test_a_good_file_is_imported_and_the_counts_show_on_the_message(browse, support_user):
    message = MessageFactory(subject="Welcome to the new term")
    with browse(support_user) as page:
        upload(page, message, "students.csv", GOOD)

        expect(page.locator(".messagelist .success")).to_have_text(
            "Imported 3 recipients from students.csv. Skipped 1 duplicate (line 5)."
        )
        expect(page).to_have_url(reverse("admin:sending_message_change", args=[message.pk]))
        recipients = page.locator(".message-recipients")
        expect(recipients).to_contain_text("0 of 3 finished")
        expect(recipients).to_contain_text("Queued: 3")
        expect(page.get_by_role("link", name="Recipients (3)")).to_be_visible()
        # The preview renders for the first recipient, merge fields filled in.
        expect(page.locator(".message-preview")).to_contain_text("ada@example.edu")
    assert sorted(message.recipients.values_list("email", flat=True)) == [
        "ada@example.edu",
        "alan@example.edu",
        "grace@example.edu",
    ]


def test_a_bad_file_lists_its_problems_by_line_and_imports_nothing(browse, support_user):
    message = MessageFactory(subject="Welcome to the new term")
    with browse(support_user) as page:
        upload(page, message, "students.csv", BAD)

        expect(page.locator(".import-errors .errornote")).to_have_text(
            "Nothing was imported. Fix these 2 problems and upload the file again."
        )
        expect(page.locator(".import-errors li")).to_have_text(
            [
                "Line 3: “not-an-address” is not a valid email address.",
                "Line 5: “@example.edu” is not a valid email address.",
            ]
        )
        # Still on the import page, ready for the corrected file.
        expect(page.get_by_role("button", name="Import")).to_be_enabled()
        page.get_by_role("link", name="Cancel").click()
        expect(page.locator(".message-recipients")).to_contain_text("No recipients yet.")
    assert message.recipients.count() == 0
