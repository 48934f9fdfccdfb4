"""Standard Webhooks signatures (https://www.standardwebhooks.com).

A secret is ``whsec_`` and the base64 of its key bytes. A delivery carries
``webhook-id`` (the delivery's id, the same on every retry so receivers can drop
duplicates), ``webhook-timestamp`` (Unix seconds of this attempt) and
``webhook-signature``: ``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body``
under each key, space separated, so a receiver that knows either the current or the
previous secret of a rotation accepts it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
KEY_BYTES = 32  # HMAC-SHA256's block-sized key is more than enough; 24 is the spec's floor


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The key bytes of ``whsec_<base64>``; ValueError for anything else (never echoing it)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(key) < 24:
        raise ValueError("a webhook secret needs at least 24 bytes of key (32 base64 characters)")
    return key


def sign(secrets_in_use: Sequence[str], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one ``v1,`` signature per secret."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(secret_key(s), signed, hashlib.sha256).digest()).decode()
        for s in secrets_in_use
    )
