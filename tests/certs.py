"""A self-signed certificate for localhost and 127.0.0.1, made by the openssl command, for the
TLS tests (relayq's own ports, and destinations the router reaches over TLS)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="needs the openssl command")


def self_signed(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) as PEM files in `folder`, valid for a day."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=relayq-test", "-keyout", str(key),
         "-out", str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key
