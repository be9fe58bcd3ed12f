"""Server TLS credentials from the certificate files in settings, re-read when
the files change.

gRPC asks for the certificate configuration before every new connection's
handshake; the answer is the files' current contents once they changed and
form a valid pair, else "no change". A certificate rotated in place (by
cert-manager, a re-mounted Kubernetes Secret, a script) therefore serves new
connections without a restart, while open connections keep the one they
negotiated. A half-written rotation (a new certificate beside the old key) is
not taken: the previous pair keeps serving until the files agree again.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import grpc

from common.errors import Unavailable
from common.settings import Settings

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int], ...]


class CertificateFiles:
    """The server chain, its key and (for mutual TLS) the client CA, as files."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._paths = [p for p in (cert, key, client_ca) if p is not None]
        stamp = self._stamp()
        try:
            self.initial = self._load()
        except (OSError, ssl.SSLError) as exc:
            raise Unavailable(f"cannot use the TLS files: {exc}") from exc
        self._loaded = stamp

    def _stamp(self) -> _Stamp | None:
        try:
            stats = [os.stat(p) for p in self._paths]
        except OSError:
            return None
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        chain, key = self._cert.read_bytes(), self._key.read_bytes()
        client_ca = self._client_ca.read_bytes() if self._client_ca else None
        # Refuses a key that does not belong to the certificate, or unparsable PEM.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self._cert, self._key)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake question: a new configuration, or None to keep the current one."""
        stamp = self._stamp()
        if stamp is None or stamp == self._loaded:
            return None
        try:
            config = self._load()
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS files changed but cannot be used yet; keeping the previous ones: %s", exc)
            return None
        if self._stamp() != stamp:
            return None  # changed again while being read: take it on the next handshake
        self._loaded = stamp
        log.info("TLS certificate reloaded", extra={"cert": str(self._cert)})
        return config


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from the certificate paths in settings, reloaded on change; with a client
    CA, mutual TLS (a client without a certificate signed by that CA cannot connect)."""
    if not settings.server_tls:
        return None
    client_ca = Path(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
    files = CertificateFiles(Path(settings.tls_cert_file), Path(settings.tls_key_file), client_ca)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=client_ca is not None
    )
