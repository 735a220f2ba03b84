"""Standard Webhooks signatures (https://www.standardwebhooks.com, v1): what a receiver checks
to trust that a request came from us, unchanged, and recently.

Each request carries `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`:
`v1,` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.".encode() + body)) for every secret of the
destination that has not expired, space-separated. During a rotation's grace period that is
two signatures, so a receiver holding either secret verifies the request; afterwards only the
new one signs. A secret is `whsec_` + base64 of its key bytes.

The HMAC's key schedule is done once per secret (hmac objects are copied per request), so a
signature costs one pass of SHA-256 over the body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from datetime import datetime

SECRET_PREFIX = "whsec_"


class BadSecret(ValueError):
    """A stored secret that is not `whsec_` + base64 (written by hand, say)."""


def key_of(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise BadSecret(f"a signing secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except binascii.Error:
        raise BadSecret("a signing secret is whsec_ followed by base64") from None
    if not key:
        raise BadSecret("a signing secret is not empty")
    return key


class Signer:
    """Signs with every secret not yet expired at the time of signing."""

    def __init__(self, secrets: Iterable[tuple[str, datetime | None]]) -> None:
        # (expires at as Unix seconds or None, the keyed HMAC), newest secret first.
        self._keys = [(None if expires is None else expires.timestamp(),
                       hmac.new(key_of(secret), digestmod=hashlib.sha256))
                      for secret, expires in secrets]
        self._next_expiry = min((e for e, _ in self._keys if e is not None), default=None)

    @property
    def signs(self) -> bool:
        """Has at least one secret (a destination made before signing had none)."""
        return bool(self._keys)

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The webhook-signature header value ("" when no secret is in force)."""
        if self._next_expiry is not None and timestamp >= self._next_expiry:
            self._drop_expired(timestamp)
        prefix = f"{msg_id}.{timestamp}.".encode()
        signatures = []
        for _, keyed in self._keys:
            mac = keyed.copy()
            mac.update(prefix)
            mac.update(body)
            signatures.append("v1," + base64.b64encode(mac.digest()).decode())
        return " ".join(signatures)

    def _drop_expired(self, now: float) -> None:
        """The grace period ended: the old secret stops signing, by the clock, with no reload
        needed (nothing notifies the router when time passes)."""
        self._keys = [(e, k) for e, k in self._keys if e is None or e > now]
        self._next_expiry = min((e for e, _ in self._keys if e is not None), default=None)
