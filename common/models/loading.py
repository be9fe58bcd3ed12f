"""Load any registered model version into a runnable module, for every format.

Nothing is ever unpickled: built-in families' weights are safetensors, TorchScript archives go
through ``torch.jit.load`` (TorchScript's own restricted deserializer), and
``torch.export`` programs load with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` because
``torch.export.load`` silently retries ``torch.load(weights_only=False)`` when
the safe load fails; the variable overrides that retry. Programs are verified
(``common.models.verify``) before anything runs them.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.artifacts import ArtifactRef, ArtifactStore
from common.errors import InvalidArgument
from common.models import verify
from common.models.families import Specs, family_of, tensor_specs
from common.models.signature import export_signature

log = logging.getLogger(__name__)

_WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@dataclass
class LoadedModel:
    module: torch.nn.Module  # in eval mode, on `device`
    inputs: list[model_pb2.TensorSpec]
    outputs: list[model_pb2.TensorSpec]
    device: torch.device


def save_weights(model: torch.nn.Module, store: ArtifactStore) -> ArtifactRef:
    """A built-in family's state dict as safetensors, atomically into the store."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    scratch = store.scratch_dir()
    try:
        path = scratch / "model.safetensors"
        save_file(state, str(path))
        return store.put_file(path)
    finally:
        for child in scratch.iterdir():
            child.unlink()
        scratch.rmdir()


def load_model(version: registry_pb2.ModelVersion, store: ArtifactStore, device: torch.device) -> LoadedModel:
    """The version's module in eval mode on ``device``, with its tensor specs.

    Raises InvalidArgument when the artifact does not match its format (so a bad
    upload fails its load, never the server), NotFound/DataLoss from the store.
    """
    where = f"model {version.model_name!r} version {version.version!r}"
    path = store.path(version.artifact_digest)
    fmt = version.format
    traced: Specs | None = None
    try:
        if fmt == registry_pb2.MODEL_FORMAT_SAFETENSORS:
            module = _load_safetensors(version, path, device, where)
        elif fmt == registry_pb2.MODEL_FORMAT_TORCHSCRIPT:
            module = _load_torchscript(path, device, where)
        elif fmt == registry_pb2.MODEL_FORMAT_TORCH_EXPORT:
            module, traced = _load_export(version, path, device, where)
        elif fmt == registry_pb2.MODEL_FORMAT_COMPRESSED:
            from common.models.compressed import load_compressed  # optional format, imported on first use

            module = load_compressed(version, path, device).eval()
        else:
            raise InvalidArgument(f"{where}: format {registry_pb2.ModelFormat.Name(fmt)} cannot be served")
    except InvalidArgument:
        raise
    except (RuntimeError, ValueError, SafetensorError, OSError, KeyError, pickle.UnpicklingError) as exc:
        # Corrupt or hostile artifacts surface here (including the weights-only
        # unpickler refusing a pickle payload); report them as a bad model.
        log.warning("model artifact refused", extra={"model": version.model_name, "version": version.version})
        raise InvalidArgument(
            f"{where}: artifact is not a loadable {registry_pb2.ModelFormat.Name(fmt)}: {first_line(exc)}"
        ) from exc
    inputs, outputs = _specs(version, where, traced)
    return LoadedModel(module=module, inputs=inputs, outputs=outputs, device=device)


def _load_safetensors(
    version: registry_pb2.ModelVersion, path: Path, device: torch.device, where: str
) -> torch.nn.Module:
    if version.architecture.WhichOneof("family") is None:
        raise InvalidArgument(f"{where}: SAFETENSORS models need an architecture")
    family, arch = family_of(version.architecture, f"{where}: architecture")
    # Every weight is in the file (the load is strict), at least a byte each: an
    # architecture promising more is refused before it is allocated.
    count, size = family.parameter_count(arch), path.stat().st_size
    if count > size:
        raise InvalidArgument(
            f"{where}: the architecture has {count:,} parameters but the artifact holds only {size:,} bytes"
        )
    norm = version.normalization if version.HasField("normalization") else None
    model = family.build(arch, norm)
    state = load_file(str(path), device="cpu")
    if set(state) != set(model.state_dict()):
        state = _sequential_keys(state, list(model.state_dict())) or state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InvalidArgument(
            f"{where}: weights do not match the architecture "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    return model.to(device).eval()


def _load_torchscript(path: Path, device: torch.device, where: str) -> torch.nn.Module:
    verify.check_torchscript_archive(path, where)  # loading runs a scripted __setstate__
    module = torch.jit.load(str(path), map_location=device)
    verify.check_torchscript_module(module, where)
    return module.eval()


def _load_export(
    version: registry_pb2.ModelVersion, path: Path, device: torch.device, where: str
) -> tuple[torch.nn.Module, Specs | None]:
    """The verified program's module, never unpickling, and the signature it was
    traced with when the version does not declare all of its own."""
    verify.check_archive_entries(path, where)
    # Left set for the process: a serving process must never unpickle.
    os.environ[_WEIGHTS_ONLY_ENV] = "1"
    program = torch.export.load(str(path))
    verify.check_exported_program(program, where)
    traced = None if version.inputs and version.outputs else export_signature(program)
    # An exported program has no train/eval mode: it was traced in the mode it serves in.
    module: torch.nn.Module = program.module()
    return module.to(device), traced


# A Linear layer's key in an nn.Sequential state dict, under any wrapper prefixes
# (DataParallel's "module.", our MLP's "layers.", a user's "model.").
_SEQUENTIAL_KEY = re.compile(r"(?:(?:module|model|layers)\.)*(\d+)\.(weight|bias)")


def _sequential_keys(state: dict[str, torch.Tensor], expected: list[str]) -> dict[str, torch.Tensor] | None:
    """A plain ``nn.Sequential``'s weights renamed onto the MLP's Linear layers, in
    order ("0.weight", "2.bias", ... with or without dropout between them); None
    when the two do not have the same layers."""

    def linears(keys: list[str]) -> list[dict[str, str]] | None:
        found: dict[int, dict[str, str]] = {}
        for key in keys:
            match = _SEQUENTIAL_KEY.fullmatch(key)
            if match is not None:
                found.setdefault(int(match[1]), {})[match[2]] = key
        return [found[i] for i in sorted(found)] or None

    theirs, ours = linears(list(state)), linears(expected)
    if theirs is None or ours is None or len(theirs) != len(ours):
        return None
    renamed = {key: value for key, value in state.items() if not _SEQUENTIAL_KEY.fullmatch(key)}
    for their_layer, our_layer in zip(theirs, ours, strict=True):
        if set(their_layer) != set(our_layer):
            return None
        for part, key in their_layer.items():
            renamed[our_layer[part]] = state[key]
    return renamed


def _specs(version: registry_pb2.ModelVersion, where: str, traced: Specs | None) -> Specs:
    if traced is not None:  # declared specs win; the rest is what the program was traced with
        return list(version.inputs) or traced[0], list(version.outputs) or traced[1]
    if version.inputs and version.outputs:
        return list(version.inputs), list(version.outputs)
    if version.architecture.WhichOneof("family") is not None:
        return tensor_specs(version.architecture)
    raise InvalidArgument(f"{where}: the version declares no input/output tensor specs")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
