from __future__ import annotations

import hashlib
import os

import pytest

from common.artifacts import ArtifactStore
from common.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted


def test_put_and_read_are_content_addressed(store: ArtifactStore) -> None:
    ref = store.put_bytes(b"weights")
    assert ref.digest == hashlib.sha256(b"weights").hexdigest()
    assert store.read_bytes(ref.digest) == b"weights"
    assert store.path(ref.digest).read_bytes() == b"weights"
    assert store.put_bytes(b"weights") == ref  # same bytes, same artifact


def test_failed_write_leaves_nothing(store: ArtifactStore) -> None:
    with pytest.raises(ResourceExhausted), store.writer(limit=4) as w:
        w.write(b"12")
        w.write(b"345")
    with pytest.raises(RuntimeError), store.writer() as w:
        w.write(b"partial")
        raise RuntimeError("client went away")
    assert list((store.root / "tmp").iterdir()) == []
    assert not store.exists(hashlib.sha256(b"partial").hexdigest())


def test_corruption_is_detected(store: ArtifactStore) -> None:
    ref = store.put_bytes(b"model")
    fresh = ArtifactStore(store.root)  # a new process has verified nothing yet
    path = fresh.path(ref.digest, verify=False)
    os.chmod(path, 0o644)
    path.write_bytes(b"mode1")
    with pytest.raises(DataLoss):
        fresh.path(ref.digest)
    with pytest.raises(DataLoss):
        fresh.read_bytes(ref.digest)


def test_bad_and_unknown_digests(store: ArtifactStore) -> None:
    with pytest.raises(InvalidArgument):
        store.path("../../etc/passwd")
    with pytest.raises(NotFound):
        store.path("0" * 64)
