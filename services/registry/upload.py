"""UploadModel without gRPC: check the header, stream the bytes into the
artifact store, prove the artifact loads, then register it.

A failed upload registers nothing and leaves no bytes behind, unless the same
bytes were already in the store or another version references them (the store
is content-addressed, so they are shared).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from types import TracebackType

import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactRef, ArtifactStore, ArtifactWriter
from common.datatypes import NUMPY
from common.errors import Cancelled, FailedPrecondition, InvalidArgument, ModelfleetError
from common.models.families import family_of, tensor_specs
from common.models.inputs import is_normalized
from common.models.loading import LoadedModel, first_line, load_model
from common.names import validate_name
from common.registry import ModelRegistry
from services.inference.codec import Signature, output_array, outputs_of, zero_inputs

log = logging.getLogger(__name__)

# Formats whose artifact holds only weights, so the header must carry the architecture.
_NEEDS_ARCHITECTURE = (registry_pb2.MODEL_FORMAT_SAFETENSORS, registry_pb2.MODEL_FORMAT_COMPRESSED)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def first_header(request: registry_pb2.UploadModelRequest | None) -> registry_pb2.UploadModelHeader:
    """The header from the stream's first message; InvalidArgument if it is not one."""
    if request is None or request.WhichOneof("part") != "header":
        raise InvalidArgument("the first UploadModel message must carry the header")
    return request.header


def check_header(header: registry_pb2.UploadModelHeader) -> None:
    """Everything that can be checked before any byte arrives."""
    validate_name(header.name, "header.name")
    if header.format == registry_pb2.MODEL_FORMAT_UNSPECIFIED:
        raise InvalidArgument("header.format is required")
    fmt = registry_pb2.ModelFormat.Name(header.format)
    if header.format in _NEEDS_ARCHITECTURE:
        if header.architecture.WhichOneof("family") is None:
            raise InvalidArgument(f"header.architecture is required for {fmt}")
        family, arch = family_of(header.architecture, "header.architecture")
        family.validate(arch, "header.architecture")
    elif not (header.inputs and header.outputs) and header.format != registry_pb2.MODEL_FORMAT_TORCH_EXPORT:
        # A torch.export program carries its own signature; TorchScript does not.
        raise InvalidArgument(f"header.inputs and header.outputs are required for {fmt}")
    for field, specs in (("inputs", header.inputs), ("outputs", header.outputs)):
        for i, spec in enumerate(specs):
            _check_spec(spec, f"header.{field}[{i}]")
    if header.sha256 and not _SHA256.match(header.sha256.lower()):
        raise InvalidArgument(f"header.sha256 {header.sha256!r} is not a sha256 hex digest")
    if is_normalized(header.normalization):
        _check_normalization(header)


def _check_spec(spec: model_pb2.TensorSpec, where: str) -> None:
    if not spec.name:
        raise InvalidArgument(f"{where}.name is required")
    if spec.datatype not in NUMPY:
        # One table for upload, codec and CLI: UINT16/32/64 and BYTES exist in the
        # protocol, but a torch model cannot take them, so no replica could serve them.
        raise InvalidArgument(
            f"{where}.datatype {spec.datatype!r} is not one this server serves "
            f"(one of {', '.join(sorted(NUMPY))})"
        )
    if any(dim < -1 or dim == 0 for dim in spec.shape):
        raise InvalidArgument(f"{where}.shape {list(spec.shape)} must hold positive sizes or -1")


def _check_normalization(header: registry_pb2.UploadModelHeader) -> None:
    norm = header.normalization
    if len(norm.shift) != len(norm.scale):
        raise InvalidArgument(
            f"header.normalization has {len(norm.shift)} shift and {len(norm.scale)} scale values"
        )
    width = 0
    if header.architecture.WhichOneof("family") is not None:
        family, arch = family_of(header.architecture, "header.architecture")
        width = family.input_width(arch)
    for field, values in (("shift", norm.shift), ("fill", norm.fill)):
        if width and values and len(values) != width:
            raise InvalidArgument(
                f"header.normalization.{field} has {len(values)} values for {width} input features"
            )
    if norm.kind != model_pb2.NORMALIZATION_KIND_NONE and width and len(norm.shift) != width:
        raise InvalidArgument(f"header.normalization has {len(norm.shift)} values for {width} input features")
    if any(s == 0 for s in norm.scale):
        raise InvalidArgument("header.normalization.scale must not contain zeros")


def candidate_version(header: registry_pb2.UploadModelHeader, ref: ArtifactRef) -> registry_pb2.ModelVersion:
    """The version to validate and register; a built-in family's tensor specs fill
    absent inputs/outputs."""
    version = registry_pb2.ModelVersion(
        model_name=header.name,
        format=header.format,
        artifact_digest=ref.digest,
        artifact_size_bytes=ref.size,
        description=header.description,
        labels=dict(header.labels),
        metrics=dict(header.metrics),
        class_names=list(header.class_names),
        inputs=list(header.inputs),
        outputs=list(header.outputs),
    )
    if header.HasField("architecture"):
        version.architecture.CopyFrom(header.architecture)
    if header.HasField("normalization"):
        version.normalization.CopyFrom(header.normalization)
    if header.architecture.WhichOneof("family") is not None:
        inputs, outputs = tensor_specs(header.architecture)
        if not version.inputs:
            version.inputs.extend(inputs)
        if not version.outputs:
            version.outputs.extend(outputs)
    return version


class ModelUpload:
    """One upload: construct with the header, ``write`` the chunks, then
    ``commit`` (validate and register) or ``abort``. Not thread-safe; the
    caller feeds it from one stream."""

    def __init__(
        self,
        header: registry_pb2.UploadModelHeader,
        store: ArtifactStore,
        registry: ModelRegistry,
        limit: int,
    ) -> None:
        check_header(header)
        self._header = header
        self._store = store
        self._registry = registry
        self._cm = store.writer(limit=limit)
        self._writer: ArtifactWriter | None = self._cm.__enter__()

    def write(self, chunk: bytes) -> None:
        writer = self._open()
        try:
            writer.write(chunk)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the bytes received so far; idempotent."""
        if self._writer is not None:
            self._writer = None
            self._close(Cancelled("upload aborted"))

    def commit(self, before_commit: Callable[[], None] | None = None) -> registry_pb2.ModelVersion:
        """Publish the bytes, prove they load as the declared model, register.
        ``before_commit`` runs just before the registration and may raise to abandon it."""
        writer = self._open()
        digest = writer.digest
        expected = self._header.sha256.lower()
        if expected and expected != digest:
            self.abort()
            raise InvalidArgument(f"header.sha256 is {expected} but the uploaded bytes hash to {digest}")
        shared = self._store.exists(digest)  # already stored: not ours to delete on failure
        self._writer = None
        self._close(None)
        ref = ArtifactRef(digest, writer.size)
        candidate = candidate_version(self._header, ref)
        try:
            _check_loads(candidate, self._store)
            if before_commit is not None:
                before_commit()
            version = self._registry.register(candidate)
        except BaseException:
            if not shared and not _referenced(self._registry, digest):
                self._store.delete(digest)
            raise
        log.info(
            "model uploaded",
            extra={"model": version.model_name, "version": version.version, "size": ref.size},
        )
        return version

    def _open(self) -> ArtifactWriter:
        if self._writer is None:
            raise InvalidArgument("the upload is already finished")
        return self._writer

    def _close(self, exc: BaseException | None) -> None:
        tb: TracebackType | None = exc.__traceback__ if exc is not None else None
        self._cm.__exit__(type(exc) if exc is not None else None, exc, tb)


def _check_loads(candidate: registry_pb2.ModelVersion, store: ArtifactStore) -> None:
    """Load the artifact on CPU and run it once; any failure means the bytes are not
    the declared model. Specs the header left out are filled into ``candidate`` from
    the loaded artifact (a torch.export program's traced signature)."""
    fmt = registry_pb2.ModelFormat.Name(candidate.format)
    try:
        probe = registry_pb2.ModelVersion()
        probe.CopyFrom(candidate)
        probe.version = "upload"  # names the candidate in load errors
        loaded = load_model(probe, store, torch.device("cpu"))
        if not candidate.inputs:
            candidate.inputs.extend(loaded.inputs)
        if not candidate.outputs:
            candidate.outputs.extend(loaded.outputs)
        _check_runs(loaded, candidate.model_name)
    except ModelfleetError:
        raise
    except Exception as exc:
        # Untrusted bytes can fail deep inside torch in ways load_model does not classify.
        log.warning("uploaded artifact does not load", exc_info=True, extra={"model": candidate.model_name})
        raise InvalidArgument(
            f"uploaded artifact is not a loadable {fmt} model: {type(exc).__name__}"
        ) from exc


def _check_runs(loaded: LoadedModel, model: str) -> None:
    """Run the module on zeros of its declared inputs (batch 1), so a model that
    cannot serve its own signature is refused now, not at its first request. A
    signature with variable dims past the batch (an image's height) has no size
    known to be valid, so it is not run (verification has checked it)."""
    signature = Signature(model, loaded.inputs, loaded.outputs)
    if not signature.probe_ready:
        return
    inputs = zero_inputs(signature, 1, loaded.device)
    shapes = ", ".join(
        f"{spec.name} {list(t.shape)}" for spec, t in zip(signature.inputs, inputs, strict=True)
    )
    try:
        with torch.inference_mode():
            outputs = outputs_of(loaded.module(*inputs), signature.outputs)
        for name, tensor in zip(signature.outputs, outputs, strict=True):
            output_array(name, tensor)
            if signature.batchable and (tensor.ndim == 0 or tensor.shape[0] != 1):
                raise FailedPrecondition(
                    f"model output {name!r} has shape {list(tensor.shape)} for 1 input row"
                )
    except FailedPrecondition as exc:
        raise InvalidArgument(f"uploaded model does not match its declared outputs: {exc}") from exc
    except Exception as exc:  # the module is user code: any failure on its own signature is bad input
        raise InvalidArgument(
            f"uploaded model fails on zeros of its declared inputs ({shapes}): {first_line(exc)}"
        ) from exc


def _referenced(registry: ModelRegistry, digest: str) -> bool:
    """Whether any registered version uses ``digest`` (scans the registry; only
    run after a failed upload)."""
    models_token = ""
    while True:
        models, models_token = registry.list_models(page_size=200, page_token=models_token)
        for model in models:
            if _model_references(registry, model.name, digest):
                return True
        if not models_token:
            return False


def _model_references(registry: ModelRegistry, name: str, digest: str) -> bool:
    token = ""
    while True:
        versions, token = registry.list_versions(name, page_size=200, page_token=token)
        if any(v.artifact_digest == digest for v in versions):
            return True
        if not token:
            return False


__all__ = ["ModelUpload", "candidate_version", "check_header", "first_header"]
