"""Bearer-token authentication for every RPC (health and reflection excepted).

Clients send ``authorization: Bearer <token>`` metadata. Tokens are compared
in constant time. With no tokens configured, auth is off.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

from common.errors import Unauthenticated

# Methods any caller may reach: probes and API discovery.
PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


class Authenticator:
    def __init__(self, tokens: Iterable[str]) -> None:
        # Keep only digests: equal-length values for compare_digest, no plain tokens kept around.
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens if t]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def is_public(self, method: str) -> bool:
        return method.startswith(PUBLIC_SERVICES)

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """Return a principal label for the caller or raise Unauthenticated."""
        if not self.enabled:
            return "anonymous"
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value.decode() if isinstance(value, bytes) else value
                break
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        matched = -1
        for i, known in enumerate(self._digests):
            if hmac.compare_digest(digest, known):
                matched = i  # no early exit: time does not depend on which token matched
        if matched < 0:
            raise Unauthenticated("invalid bearer token")
        return f"token-{matched}"
