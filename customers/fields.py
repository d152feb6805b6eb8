"""Provider credentials encrypted at rest with keys of their own (not SECRET_KEY).

FIELD_ENCRYPTION_KEY holds one or more comma-separated Fernet keys: the first encrypts, every key
decrypts, so a key is rotated by putting the new one first and running
`manage.py rotate_encryption_keys` before the old one is dropped.
"""

import json

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models


def _fernet() -> MultiFernet:
    try:
        return MultiFernet([Fernet(key.strip().encode()) for key in settings.FIELD_ENCRYPTION_KEYS])
    except ValueError as exc:
        raise ImproperlyConfigured(
            f"FIELD_ENCRYPTION_KEY is not a valid Fernet key: {exc}"
        ) from exc


def encrypt_value(value: dict) -> str:
    return _fernet().encrypt(json.dumps(value, sort_keys=True).encode()).decode()


def decrypt_value(token: str) -> dict:
    try:
        return json.loads(_fernet().decrypt(token.encode()))
    except InvalidToken as exc:
        raise ImproperlyConfigured(
            "Stored credentials cannot be decrypted with any FIELD_ENCRYPTION_KEY."
        ) from exc


def rotate_value(token: str) -> str:
    return _fernet().rotate(token.encode()).decode()


class EncryptedJSONField(models.TextField):
    """A dict stored as a Fernet token. The plain value never reaches the database."""

    def from_db_value(self, value, expression, connection):
        if value in (None, ""):
            return {}
        return decrypt_value(value)

    def to_python(self, value):
        if isinstance(value, dict):
            return value
        if value in (None, ""):
            return {}
        return json.loads(value)

    def get_prep_value(self, value):
        return encrypt_value(value or {})
