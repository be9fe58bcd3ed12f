"""Who may call what: bearer tokens with roles, checked on every RPC (health
and reflection excepted).

Clients send ``authorization: Bearer <token>`` metadata. The server knows only
token *hashes*, from ``MODELFLEET_AUTH_TOKENS_FILE`` (lines
``sha256:<hex> <role> <client-name>``), re-read when the file changes so a
rotated Kubernetes Secret takes effect without a restart. Plain tokens in
``MODELFLEET_AUTH_TOKENS`` are a development convenience: each one is an admin.
With neither configured, auth is off and every caller is the admin
``anonymous``.

Every method has a minimum role in :data:`METHOD_ROLES`; a method missing
from the table needs admin. The caller's :class:`Principal` is put in
:data:`principal_var` so services can record who submitted a job and check
ownership (:func:`check_job_owner`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from common.errors import InvalidArgument, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

# Methods any caller may reach: probes and API discovery.
PUBLIC_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
HASH_PREFIX = "sha256:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


class Role(enum.IntEnum):
    """Ordered: each role may do everything the roles below it may."""

    READER = 1
    SUBMITTER = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise InvalidArgument(f"role must be one of reader, submitter, admin, not {text!r}") from None


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


ANONYMOUS = Principal("anonymous", Role.ADMIN)
principal_var: ContextVar[Principal | None] = ContextVar("principal", default=None)

_R, _S, _A = Role.READER, Role.SUBMITTER, Role.ADMIN
_OIP = "/inference.GRPCInferenceService/"
_REG = "/modelfleet.registry.v1.ModelRegistryService/"
_DATA = "/modelfleet.data.v1.DataService/"
_JOBS = "/modelfleet.jobs.v1.JobService/"

# The minimum role of every RPC. tests/security walks every service descriptor
# and fails if one is missing. Dataset creation from a source or by
# preprocessing is submit-like (it derives data inside the platform, bounded by
# the built-in sources); uploading arbitrary bytes is admin.
METHOD_ROLES: dict[str, Role] = {
    _OIP + "ServerLive": _R,
    _OIP + "ServerReady": _R,
    _OIP + "ModelReady": _R,
    _OIP + "ServerMetadata": _R,
    _OIP + "ModelMetadata": _R,
    _OIP + "ModelInfer": _R,
    _OIP + "ModelStreamInfer": _R,
    _OIP + "ModelStatistics": _R,
    _OIP + "RepositoryIndex": _R,
    _OIP + "RepositoryModelLoad": _A,
    _OIP + "RepositoryModelUnload": _A,
    _REG + "ListModels": _R,
    _REG + "GetModel": _R,
    _REG + "ListModelVersions": _R,
    _REG + "GetModelVersion": _R,
    _REG + "SetAlias": _A,
    _REG + "RollbackAlias": _A,
    _REG + "SetCanary": _A,
    _REG + "EndCanary": _A,
    _REG + "DeleteModelVersion": _A,
    _REG + "UploadModel": _A,
    _DATA + "UploadDataset": _A,
    _DATA + "CreateDatasetFromSource": _S,
    _DATA + "PreprocessDataset": _S,
    _DATA + "GetDataset": _R,
    _DATA + "ListDatasets": _R,
    _DATA + "ListDatasetVersions": _R,
    _DATA + "DeleteDataset": _A,
    _DATA + "StreamBatches": _R,
    _JOBS + "GetJob": _R,
    _JOBS + "ListJobs": _R,
    _JOBS + "WatchJob": _R,
    # Submitters may cancel their own jobs only; JobService checks the owner.
    _JOBS + "CancelJob": _S,
    "/modelfleet.training.v1.TrainingService/SubmitTrainingJob": _S,
    "/modelfleet.compression.v1.CompressionService/SubmitCompressionJob": _S,
}


def required_role(method: str) -> Role:
    return METHOD_ROLES.get(method, Role.ADMIN)


def hash_token(token: str) -> str:
    """The token-file form of ``token``: ``sha256:<hex>``."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TokenEntry:
    digest: bytes
    principal: Principal


def parse_token_lines(lines: Iterable[str], source: str = "tokens file") -> list[TokenEntry]:
    """Parse ``sha256:<hex> <role> <client-name>`` lines; blank lines and ``#`` comments are skipped.
    One client name may have several hashes (the old and the new token during a rotation)."""
    entries: list[TokenEntry] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        parts = line.split()
        if len(parts) != 3:
            raise InvalidArgument(f"{where}: expected 'sha256:<hex> <role> <client-name>'")
        hashed, role_text, name = parts
        hex_digest = hashed[len(HASH_PREFIX) :].lower() if hashed.startswith(HASH_PREFIX) else ""
        if not _HEX.match(hex_digest):
            raise InvalidArgument(f"{where}: the hash must be 'sha256:' and 64 hex digits")
        if not _NAME.match(name):
            raise InvalidArgument(
                f"{where}: client name {name!r} must be letters, digits, '.', '_', '@' or '-'"
            )
        try:
            role = Role.parse(role_text)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc.message}") from None
        digest = bytes.fromhex(hex_digest)
        if digest in seen:
            raise InvalidArgument(f"{where}: the same token hash is listed twice")
        seen.add(digest)
        entries.append(TokenEntry(digest, Principal(name, role)))
    return entries


def load_token_file(path: Path) -> list[TokenEntry]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidArgument(f"MODELFLEET_AUTH_TOKENS_FILE {path}: cannot read: {exc.strerror}") from None
    return parse_token_lines(text.splitlines(), str(path))


def dev_token_entries(tokens: Iterable[str]) -> list[TokenEntry]:
    """Plain tokens from MODELFLEET_AUTH_TOKENS: admins named dev-1, dev-2, ..."""
    return [
        TokenEntry(hashlib.sha256(t.encode()).digest(), Principal(f"dev-{i}", Role.ADMIN))
        for i, t in enumerate((t for t in tokens if t), 1)
    ]


class Authenticator:
    """Maps a bearer token to a principal and checks it against the method table."""

    def __init__(
        self,
        plain_tokens: Iterable[str] = (),
        tokens_file: Path | None = None,
        reload_interval_s: float = 5.0,
    ) -> None:
        self._dev = dev_token_entries(plain_tokens)
        self._file = tokens_file
        self._reload_interval_s = reload_interval_s
        self._lock = threading.Lock()
        self._file_stamp: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self._entries = list(self._dev)
        if tokens_file is not None:
            # A bad file at start-up stops the server; a bad file later keeps the last good one.
            self._entries = [*self._dev, *load_token_file(tokens_file)]
            self._file_stamp = _stamp(tokens_file)
            self._checked_at = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self._file is not None or bool(self._dev)

    def is_public(self, method: str) -> bool:
        return method.startswith(PUBLIC_SERVICES)

    def reload_if_changed(self) -> None:
        """Re-read the tokens file if it changed (at most every ``reload_interval_s``)."""
        if self._file is None or time.monotonic() - self._checked_at < self._reload_interval_s:
            return
        with self._lock:
            self._checked_at = time.monotonic()
            stamp = _stamp(self._file)
            if stamp == self._file_stamp:
                return
            try:
                entries = load_token_file(self._file)
            except InvalidArgument as exc:
                log.error("keeping the previous tokens: %s", exc.message)
                return
            self._entries = [*self._dev, *entries]
            self._file_stamp = stamp
            log.info("tokens file reloaded", extra={"tokens": len(entries)})

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        """Return the caller's principal or raise Unauthenticated."""
        if not self.enabled:
            return ANONYMOUS
        self.reload_if_changed()
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value.decode() if isinstance(value, bytes) else value
                break
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")
        digest = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for entry in self._entries:
            # Compare against every entry, no early exit: the time taken does not say which one matched.
            if hmac.compare_digest(digest, entry.digest):
                found = entry.principal
        if found is None:
            raise Unauthenticated("invalid bearer token")
        return found

    def authorize(self, method: str, principal: Principal) -> None:
        needed = required_role(method)
        if principal.role < needed:
            who = f"client {principal.name!r} has role {principal.role.label}"
            raise PermissionDenied(f"{method} needs role {needed.label}; {who}")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def current_principal() -> Principal:
    """The caller of the RPC being served (anonymous admin outside one, e.g. in tests of domain code)."""
    return principal_var.get() or ANONYMOUS


def check_job_owner(job_id: str, submitted_by: str) -> None:
    """Admins may act on any job; anyone else only on jobs they submitted."""
    principal = current_principal()
    if principal.role >= Role.ADMIN or (submitted_by and submitted_by == principal.name):
        return
    raise PermissionDenied(
        f"job {job_id} was submitted by {submitted_by or 'another client'!r}; "
        f"client {principal.name!r} may cancel only its own jobs (admin may cancel any)"
    )
