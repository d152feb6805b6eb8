"""Worker tokens are signed with WORKER_TOKEN_KEY, a key of their own: rotating SECRET_KEY does
not touch them, and a rotated token key is still accepted from WORKER_TOKEN_KEY_FALLBACKS."""

import pytest
from django.core import signing
from django.core.exceptions import ImproperlyConfigured

from sending import tokens


def test_a_token_is_signed_with_the_worker_token_key_not_secret_key(settings):
    settings.WORKER_TOKEN_KEY = "worker-token-key-one"
    token = tokens.mint(customer_id=3, worker_id=7)

    assert signing.loads(token, key="worker-token-key-one", salt=tokens.SALT) == {"c": 3, "w": 7}
    with pytest.raises(signing.BadSignature):
        signing.loads(token, key=settings.SECRET_KEY, salt=tokens.SALT)
    # Rotating SECRET_KEY (sessions) leaves worker tokens valid.
    settings.SECRET_KEY = "a-brand-new-secret-key-" + "x" * 40
    settings.SECRET_KEY_FALLBACKS = []
    assert tokens.verify(token) == tokens.WorkerClaims(customer_id=3, worker_id=7)


def test_a_token_signed_with_a_rotated_key_is_accepted_from_the_fallbacks(settings):
    settings.WORKER_TOKEN_KEY = "old-worker-token-key"
    old = tokens.mint(customer_id=1, worker_id=2)

    settings.WORKER_TOKEN_KEY = "new-worker-token-key"
    settings.WORKER_TOKEN_KEY_FALLBACKS = ["old-worker-token-key"]
    assert tokens.verify(old) == tokens.WorkerClaims(customer_id=1, worker_id=2)
    new = tokens.mint(customer_id=1, worker_id=2)
    assert signing.loads(new, key="new-worker-token-key", salt=tokens.SALT) == {"c": 1, "w": 2}

    # Once the old key leaves the fallbacks, its tokens are refused.
    settings.WORKER_TOKEN_KEY_FALLBACKS = []
    with pytest.raises(tokens.TokenRejected, match="signature"):
        tokens.verify(old)
    assert tokens.verify(new).worker_id == 2


def test_without_a_key_no_token_is_minted_or_accepted(settings):
    settings.WORKER_TOKEN_KEY = "some-key"
    token = tokens.mint(customer_id=1, worker_id=2)
    settings.WORKER_TOKEN_KEY = ""
    with pytest.raises(ImproperlyConfigured, match="WORKER_TOKEN_KEY"):
        tokens.mint(customer_id=1, worker_id=2)
    with pytest.raises(ImproperlyConfigured, match="WORKER_TOKEN_KEY"):
        tokens.verify(token)
