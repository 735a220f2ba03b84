"""Standard Webhooks signatures: router_service.signing checked against the independent
reference verifier (the `standardwebhooks` package), and the secrets jobsdb makes."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
import standardwebhooks

from jobsdb.keys import new_signing_secret
from router_service.signing import BadSecret, Signer


def _headers(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature}


def _now() -> int:
    return int(datetime.now(UTC).timestamp())


def test_a_new_secret_has_the_standard_form() -> None:
    secret = new_signing_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert new_signing_secret() != secret


def test_the_reference_verifier_accepts_our_signature_and_only_for_these_bytes() -> None:
    secret = new_signing_secret()
    body = '{"messageId":"m1","properties":{"name":"Zoë ✓"}}'.encode()
    now = _now()
    signature = Signer([(secret, None)]).signature("msg_42", now, body)
    assert signature.startswith("v1,")
    verifier = standardwebhooks.Webhook(secret)
    assert verifier.verify(body, _headers("msg_42", now, signature))["messageId"] == "m1"
    for changed in (_headers("msg_43", now, signature), _headers("msg_42", now + 1, signature)):
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            verifier.verify(body, changed)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(body.replace(b"m1", b"m2"), _headers("msg_42", now, signature))
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_signing_secret()).verify(
            body, _headers("msg_42", now, signature))


def test_every_secret_in_force_signs_until_its_grace_period_ends() -> None:
    old, new = new_signing_secret(), new_signing_secret()
    now = _now()
    expires = datetime.fromtimestamp(now + 60, UTC)
    signer = Signer([(new, None), (old, expires)])
    body = b'{"a":1}'

    during = signer.signature("msg_1", now, body)
    assert len(during.split(" ")) == 2
    for secret in (old, new):
        standardwebhooks.Webhook(secret).verify(body, _headers("msg_1", now, during))

    # By the clock alone: the router is told nothing when a grace period ends.
    after = signer.signature("msg_1", now + 60, body)
    assert len(after.split(" ")) == 1
    assert after == Signer([(new, None)]).signature("msg_1", now + 60, body)


def test_no_secret_means_no_signature_and_bad_secrets_are_refused() -> None:
    signer = Signer([])
    assert not signer.signs
    assert signer.signature("msg_1", _now(), b"{}") == ""
    gone = Signer([(new_signing_secret(), datetime.now(UTC) - timedelta(seconds=1))])
    assert gone.signature("msg_1", _now(), b"{}") == ""
    for bad in ("secret", "whsec_", "whsec_not base64!", "rq_wk_abc"):
        with pytest.raises(BadSecret):
            Signer([(bad, None)])
