"""Content-addressed artifact store on a filesystem root (a local disk or a
shared ReadWriteMany volume).

Artifacts are immutable and named by the sha256 of their bytes:
``<root>/sha256/<ab>/<digest>``. Writes go to ``<root>/tmp`` and are renamed
into place only once complete and hashed, so a reader never sees a partial
artifact and a failed write leaves nothing behind. Reads check the digest
(once per process per file) so corruption surfaces as DataLoss, not as a
wrong model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from common.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ArtifactRef:
    digest: str
    size: int


class ArtifactWriter:
    """Streams bytes into a temp file while hashing them; see ArtifactStore.writer."""

    def __init__(self, handle: BinaryIO, limit: int | None) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self._limit = limit
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            raise ResourceExhausted(f"artifact exceeds the size limit of {self._limit} bytes")
        self._hash.update(data)
        self._handle.write(data)

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()


class ArtifactStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _final(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise InvalidArgument(f"artifact digest {digest!r} is not a sha256 hex digest")
        return self.root / "sha256" / digest[:2] / digest

    @contextlib.contextmanager
    def writer(self, limit: int | None = None) -> Iterator[ArtifactWriter]:
        """Write an artifact in pieces; on a clean exit it is published and
        ``writer.digest``/``writer.size`` name it. On an exception the temp file
        is removed and nothing is published."""
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                writer = ArtifactWriter(handle, limit)
                yield writer
                handle.flush()
                os.fsync(handle.fileno())
            self._publish(tmp, writer.digest)
        finally:
            tmp.unlink(missing_ok=True)

    def _publish(self, tmp: Path, digest: str) -> None:
        final = self._final(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            return  # same bytes already stored
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        with self._lock:
            self._verified.add(digest)

    def put_bytes(self, data: bytes) -> ArtifactRef:
        with self.writer() as w:
            w.write(data)
        return ArtifactRef(w.digest, w.size)

    def put_file(self, src: Path | str) -> ArtifactRef:
        with self.writer() as w, open(src, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                w.write(chunk)
        return ArtifactRef(w.digest, w.size)

    def exists(self, digest: str) -> bool:
        return self._final(digest).exists()

    def size(self, digest: str) -> int:
        return self.path(digest, verify=False).stat().st_size

    def path(self, digest: str, verify: bool = True) -> Path:
        """Local path of an artifact (to memory-map or load), checked against its digest."""
        final = self._final(digest)
        if not final.exists():
            raise NotFound(f"artifact {digest} is not in the store")
        if verify and digest not in self._verified:
            actual = _hash_file(final)
            if actual != digest:
                raise DataLoss(f"artifact {digest} is corrupt (its bytes hash to {actual})")
            with self._lock:
                self._verified.add(digest)
        return final

    def read_bytes(self, digest: str) -> bytes:
        final = self._final(digest)
        if not final.exists():
            raise NotFound(f"artifact {digest} is not in the store")
        data = final.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise DataLoss(f"artifact {digest} is corrupt")
        return data

    def delete(self, digest: str) -> None:
        self._final(digest).unlink(missing_ok=True)
        with self._lock:
            self._verified.discard(digest)

    def scratch_dir(self) -> Path:
        """A fresh private directory on the store's filesystem for temp work
        (same filesystem, so put_file of its files stays cheap)."""
        return Path(tempfile.mkdtemp(dir=self._tmp, prefix="work-"))


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
