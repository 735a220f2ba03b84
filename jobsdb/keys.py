"""Secrets handed to users (write keys, admin tokens) and how they are stored."""

from __future__ import annotations

import hashlib
import secrets


def new_secret(prefix: str) -> str:
    """A 256-bit random secret with a readable prefix (rq_wk_, rq_at_) for secret scanners."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> bytes:
    """SHA-256. The secrets are random and long, so no salt or slow hash is needed."""
    return hashlib.sha256(secret.encode("utf-8")).digest()
