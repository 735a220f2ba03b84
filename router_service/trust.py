"""Whom the router trusts when it delivers over TLS: https:// webhooks and grpcs:// sinks.

The system's certificate authorities (as Python's ssl finds them, SSL_CERT_FILE included),
plus those in RELAYQ_DESTINATION_CA_FILE for destinations whose certificates a private CA
signed. Added to the system's, not put in their place: one router delivers to public services
and to the operator's own at once. gRPC reads no system store of its own (it ships a bundle),
so it is handed exactly the authorities the https context loaded: an endpoint trusted over
https is trusted over grpcs.
"""

from __future__ import annotations

import ssl
from importlib import resources
from pathlib import Path

import grpc


class Trust:
    def __init__(self, extra_ca_file: Path | None = None) -> None:
        self.ssl_context = ssl.create_default_context()
        system = len(self.ssl_context.get_ca_certs())
        if extra_ca_file is not None:
            self.ssl_context.load_verify_locations(cafile=str(extra_ca_file))
        self.grpc_credentials = grpc.ssl_channel_credentials(
            root_certificates=self._grpc_roots(from_system=system > 0))

    def _grpc_roots(self, *, from_system: bool) -> bytes | None:
        """PEM roots for gRPC (None: its own bundle).

        Only authorities loaded from files are listed; a system store that is a directory
        (capath) is read lazily and lists nothing. Then gRPC's bundle stands in for it, which
        covers the public authorities, with the private CA file added when there is one.
        """
        loaded = "".join(ssl.DER_cert_to_PEM_cert(der)
                         for der in self.ssl_context.get_ca_certs(binary_form=True))
        if from_system:
            return loaded.encode()
        if not loaded:
            return None
        return loaded.encode() + _grpc_bundle()


def _grpc_bundle() -> bytes:
    bundle = resources.files("grpc").joinpath("_cython/_credentials/roots.pem")
    return bundle.read_bytes() if bundle.is_file() else b""
