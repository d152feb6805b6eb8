"""Make sure a superuser can log in, and print how.

The password comes from EMAILOPS_ADMIN_PASSWORD, or is generated once and kept in
VAR_DIR/admin_password so that every run prints the same login.
"""

import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

USERNAME = "admin"
PASSWORD_FILE = "admin_password"  # noqa: S105 (a file name)
LOGIN_URL = "http://127.0.0.1:8000/admin/"


def admin_password() -> tuple[str, str]:
    """The password and where it came from."""
    from_env = os.environ.get("EMAILOPS_ADMIN_PASSWORD", "")
    if from_env:
        return from_env, "EMAILOPS_ADMIN_PASSWORD"
    path = settings.VAR_DIR / PASSWORD_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(18))
        path.chmod(0o600)
    return path.read_text().strip(), str(path)


class Command(BaseCommand):
    help = "Ensure the `admin` superuser exists with a known password, and print the login."

    @transaction.atomic
    def handle(self, *args, **options):
        password, source = admin_password()
        User = get_user_model()
        user, created = User.objects.get_or_create(
            **{User.USERNAME_FIELD: USERNAME},
            defaults={"is_staff": True, "is_superuser": True, "is_active": True},
        )
        fixed = []
        for flag in ("is_staff", "is_superuser", "is_active"):
            if not getattr(user, flag):
                setattr(user, flag, True)
                fixed.append(flag)
        if created or not user.check_password(password):
            # The printed login must work, so the stored password wins over a changed one.
            user.set_password(password)
            fixed.append("password")
        if fixed:
            user.save()

        if created:
            self.stdout.write(self.style.SUCCESS(f"Created the superuser {USERNAME}."))
        elif fixed:
            self.stdout.write(f"Updated the superuser {USERNAME}: {', '.join(fixed)}.")
        else:
            self.stdout.write(f"The superuser {USERNAME} is ready.")
        self.stdout.write(f"  Log in at  {LOGIN_URL}")
        self.stdout.write(f"  Username   {USERNAME}")
        self.stdout.write(f"  Password   {password}   (from {source})")
