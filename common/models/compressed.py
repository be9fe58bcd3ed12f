"""The COMPRESSED artifact format: sparse and/or quantized weights of a built-in
family's model in one safetensors file, plus a JSON metadata entry describing
how each tensor is encoded and which runtime rebuilds the module (the family
and its sizes are the registered version's architecture).

Per tensor ``<name>`` (a key of the model's state dict) the file holds one of:

- dense: ``<name>`` as float32/float16/bfloat16;
- sparse: ``<name>.mask`` (one bit per element, ``np.packbits`` big-endian) and
  ``<name>.values`` (the non-zeros in row-major order), so the size on disk
  shrinks with sparsity;
- quantized: ``<name>.codes`` (int8 for 8-bit symmetric; for k < 8 unsigned
  k-bit codes bit-packed into uint8), ``<name>.scale`` (float32 per output
  channel) and, for asymmetric codes, ``<name>.zero_point`` (int32 per output
  channel). Combined with sparse, codes are stored for the non-zeros only.

Runtimes: ``fp32``/``fp16``/``bf16`` (dense float weights of that dtype) and
``int8_dynamic`` (dynamic-quantized Linear layers on CPU, other layers fp32;
dequantized fp32 weights on CUDA, where those kernels do not exist). Nothing is
unpickled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch import nn

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.registry.v1 import registry_pb2
from common.errors import DataLoss, InvalidArgument
from common.models.families import family_of
from common.models.pruning import weight_layers

log = logging.getLogger(__name__)

FORMAT = "modelfleet.compressed/1"
RUNTIMES = ("fp32", "fp16", "bf16", "int8_dynamic")
_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class QuantizedTensor:
    """Per-output-channel (row) quantized weights: w ≈ (codes - zero_point) * scale.

    ``codes`` is int8 in [-127, 127] when ``symmetric`` (zero_point 0), else
    uint8 in [0, 2**bits - 1]."""

    codes: torch.Tensor
    scale: torch.Tensor  # float32 [rows]
    zero_point: torch.Tensor  # int32 [rows]
    bits: int
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.codes.dim() - 1)
        centred = self.codes.to(torch.int32) - self.zero_point.view(shape)
        return centred.to(torch.float32) * self.scale.view(shape)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (< 2**bits) into a uint8 array, ``bits`` bits each."""
    flat = codes.reshape(-1).astype(np.uint8)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    planes = (flat[:, None] >> shifts) & 1
    return np.packbits(planes.reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed)[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
    return (planes * weights).sum(axis=1).astype(np.uint8)


@dataclass
class CompressedTensors:
    """What :func:`save_compressed` writes: float tensors (zeros mark pruned
    weights) and, for quantized layers, their codes."""

    arch: model_pb2.Architecture
    normalization: model_pb2.Normalization
    tensors: dict[str, torch.Tensor]
    quantized: dict[str, QuantizedTensor]
    runtime: str = "fp32"


def save_compressed(bundle: CompressedTensors, path: Path) -> None:
    """Encode every tensor as small as its content allows (sparse when that is
    smaller than dense) and write one safetensors file."""
    if bundle.runtime not in RUNTIMES:
        raise InvalidArgument(f"runtime {bundle.runtime!r} is not one of {', '.join(RUNTIMES)}")
    layer_dtype = _FLOAT_DTYPES.get(bundle.runtime, torch.float32)
    arrays: dict[str, np.ndarray] = {}
    encodings: dict[str, dict[str, Any]] = {}
    for name, tensor in bundle.tensors.items():
        dense = tensor.detach().to("cpu", torch.float32)
        quant = bundle.quantized.get(name)
        is_weight = name.endswith(".weight") and dense.dim() >= 2
        # Normalization buffers stay float32: they act on raw features of any range.
        store_dtype = torch.float32 if name.startswith("norm.") else layer_dtype
        mask = dense != 0
        nnz = int(mask.sum())
        value_bytes = (quant.bits / 8) if quant else torch.finfo(store_dtype).bits / 8
        sparse = is_weight and dense.numel() / 8 + nnz * value_bytes < dense.numel() * value_bytes
        encodings[name] = {
            "shape": list(dense.shape),
            "sparse": sparse,
            "quant": {"bits": quant.bits, "symmetric": quant.symmetric} if quant else None,
        }
        if sparse:
            arrays[f"{name}.mask"] = np.packbits(mask.numpy().reshape(-1))
        if quant is None:
            values = dense[mask] if sparse else dense
            arrays[f"{name}.values" if sparse else name] = _to_numpy(values.to(store_dtype))
            continue
        codes = quant.codes.detach().cpu()
        codes = codes[mask] if sparse else codes.reshape(-1)
        if quant.bits == 8 and quant.symmetric:
            arrays[f"{name}.codes"] = codes.to(torch.int8).numpy()
        else:
            arrays[f"{name}.codes"] = pack_bits(codes.to(torch.uint8).numpy(), quant.bits)
        arrays[f"{name}.scale"] = quant.scale.detach().cpu().to(torch.float32).numpy()
        if not quant.symmetric:
            arrays[f"{name}.zero_point"] = quant.zero_point.detach().cpu().to(torch.int32).numpy()
    metadata = {
        "format": FORMAT,
        "runtime": bundle.runtime,
        "tensors": json.dumps(encodings, separators=(",", ":")),
    }
    save_file(arrays, str(path), metadata=metadata)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: store its raw 16 bits (the metadata says which dtype).
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _from_numpy(array: np.ndarray, runtime: str) -> torch.Tensor:
    if runtime == "bf16" and array.dtype == np.uint16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).to(torch.float32)
    return torch.from_numpy(array.copy()).to(torch.float32)


@dataclass
class DecodedBundle:
    runtime: str
    tensors: dict[str, torch.Tensor]  # dense float32 (dequantized where quantized)
    quantized: dict[str, QuantizedTensor]


def read_compressed(path: Path) -> DecodedBundle:
    """Decode a COMPRESSED file into dense float32 tensors (+ the raw codes)."""
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise DataLoss(f"{path.name} is not a {FORMAT} artifact")
    runtime = metadata.get("runtime", "")
    if runtime not in RUNTIMES:
        raise DataLoss(f"{path.name} names an unknown runtime {runtime!r}")
    arrays = load_file(str(path))
    encodings: dict[str, dict[str, Any]] = json.loads(metadata["tensors"])
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedTensor] = {}
    for name, enc in encodings.items():
        shape = tuple(enc["shape"])
        count = int(np.prod(shape)) if shape else 1
        mask: torch.Tensor | None = None
        if enc["sparse"]:
            bits = np.unpackbits(arrays[f"{name}.mask"])[:count].astype(bool)
            mask = torch.from_numpy(bits).reshape(shape)
        quant = enc["quant"]
        if quant is None:
            if mask is None:
                tensors[name] = _from_numpy(arrays[name], runtime).reshape(shape)
            else:
                dense = torch.zeros(shape, dtype=torch.float32)
                dense[mask] = _from_numpy(arrays[f"{name}.values"], runtime)
                tensors[name] = dense
            continue
        q = _decode_quantized(arrays, name, shape, mask, int(quant["bits"]), bool(quant["symmetric"]))
        quantized[name] = q
        tensors[name] = q.dequantize()
    return DecodedBundle(runtime, tensors, quantized)


def _decode_quantized(
    arrays: dict[str, np.ndarray],
    name: str,
    shape: tuple[int, ...],
    mask: torch.Tensor | None,
    bits: int,
    symmetric: bool,
) -> QuantizedTensor:
    rows = shape[0]
    scale = torch.from_numpy(arrays[f"{name}.scale"].copy())
    zero_point = (
        torch.zeros(rows, dtype=torch.int32)
        if symmetric
        else torch.from_numpy(arrays[f"{name}.zero_point"].copy())
    )
    count = int(mask.sum()) if mask is not None else int(np.prod(shape))
    raw = arrays[f"{name}.codes"]
    stored = raw if bits == 8 and symmetric else unpack_bits(raw, bits, count)
    values = torch.from_numpy(stored.copy())
    if mask is None:
        codes = values.reshape(shape)
    else:
        # Pruned positions get the code of zero, so dequantizing them gives exactly 0.
        codes = zero_point.view(-1, *([1] * (len(shape) - 1))).expand(shape).to(values.dtype).clone()
        codes[mask] = values
    return QuantizedTensor(codes, scale, zero_point, bits, symmetric)


class CastTo(nn.Module):
    """Casts activations, so reduced-precision layers take and give float32."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


def build_runtime_module(
    arch: model_pb2.Architecture,
    normalization: model_pb2.Normalization,
    tensors: dict[str, torch.Tensor],
    quantized: dict[str, QuantizedTensor],
    runtime: str,
    device: torch.device,
) -> nn.Module:
    """The family's module in eval mode on ``device``, from decoded tensors, with
    ``runtime`` applied to its trainable part (which keeps taking normalized
    float32 features and giving float32 outputs)."""
    family, member = family_of(arch, "compressed version: architecture")
    model = family.build(member, normalization)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise DataLoss(f"compressed tensors do not match the architecture: {exc}") from None
    model.eval()
    if runtime == "int8_dynamic" and device.type != "cpu":
        log.warning("int8 dynamic kernels are CPU-only; serving dequantized fp32 weights on %s", device)
        runtime = "fp32"
    if runtime == "int8_dynamic":
        _int8_dynamic_linears(model, quantized)
    elif runtime != "fp32":
        dtype = _FLOAT_DTYPES[runtime]
        body = family.trainable(model)
        (name,) = [n for n, child in model.named_children() if child is body]
        setattr(model, name, nn.Sequential(CastTo(dtype), body.to(dtype), CastTo(torch.float32)))
    return model.to(device).eval()


def _int8_dynamic_linears(model: nn.Module, quantized: dict[str, QuantizedTensor]) -> None:
    """Replace every Linear with a dynamic-quantized one holding exactly the stored int8 codes."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for name, module in weight_layers(model).items():
        if not isinstance(module, nn.Linear):
            continue  # no dynamic int8 convolution exists: it computes with the dequantized codes
        q = quantized.get(f"{name}.weight")
        if q is None or q.bits != 8 or not q.symmetric:
            raise DataLoss(f"{name}.weight has no int8 codes for the int8_dynamic runtime")
        qlinear = DynamicLinear(module.in_features, module.out_features, dtype=torch.qint8)
        # Quantizing (codes * scale) with the same scales reproduces the codes exactly.
        qweight = torch.quantize_per_channel(
            q.dequantize(), q.scale.to(torch.float64), q.zero_point.to(torch.int64), 0, torch.qint8
        )
        qlinear.set_weight_bias(qweight, module.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, qlinear)


def load_compressed(version: registry_pb2.ModelVersion, path: Path, device: torch.device) -> nn.Module:
    """Rebuild a registered COMPRESSED version as a runnable module."""
    if version.architecture.WhichOneof("family") is None:
        raise InvalidArgument(f"compressed version {version.version} has no architecture")
    bundle = read_compressed(path)
    return build_runtime_module(
        version.architecture,
        version.normalization,
        bundle.tensors,
        bundle.quantized,
        bundle.runtime,
        device,
    )
