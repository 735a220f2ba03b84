"""Secrets handed to users (write keys, admin tokens, webhook signing secrets) and how the
ones relayq only checks are stored."""

from __future__ import annotations

import base64
import hashlib
import secrets


def new_secret(prefix: str) -> str:
    """A 256-bit random secret with a readable prefix (rq_wk_, rq_at_) for secret scanners."""
    return prefix + secrets.token_urlsafe(32)


def new_signing_secret() -> str:
    """A webhook signing secret in the Standard Webhooks form: whsec_ + base64 of 32 random
    bytes (the HMAC-SHA256 key), which their verifiers in every language read as it is."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def hash_secret(secret: str) -> bytes:
    """SHA-256. The secrets are random and long, so no salt or slow hash is needed."""
    return hashlib.sha256(secret.encode("utf-8")).digest()
