"""Quantization of a model's Linear and Conv2d weights, written back into the model (the
model then computes with exactly what will be stored and served).

What runs fast and what only saves space, on CPU:
- int8 dynamic: int8 GEMMs via quantize_dynamic (fbgemm/onednn) — ~4x smaller
  and faster at small batch;
- int8 weight-only and k-bit weight-only: integers + per-channel scales on disk
  (4x / 32/k x smaller), dequantized to fp32 on load — same speed as fp32;
- fp16 / bf16: 2x smaller; compute in that dtype (fast on GPUs, usually not
  faster on CPUs without native half-precision GEMMs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.api.modelfleet.compression.v1 import compression_spec_pb2 as spec_pb2
from common.models.compressed import QuantizedTensor
from common.models.pruning import weight_layers

NOTES: dict[int, str] = {
    spec_pb2.QUANTIZATION_METHOD_INT8_DYNAMIC: (
        "int8 dynamic: int8 weights with per-channel scales, int8 GEMMs on CPU (~4x smaller; faster for "
        "large layers, slower for tiny ones, whose per-call quantization costs more than it saves); "
        "on CUDA it is served with dequantized fp32 weights (smaller on disk only); convolutions keep "
        "int8 codes on disk but compute in fp32 (no dynamic int8 conv kernel exists)"
    ),
    spec_pb2.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY: (
        "int8 weight-only: ~4x smaller on disk, dequantized to fp32 on load (no speed-up)"
    ),
    spec_pb2.QUANTIZATION_METHOD_FP16: (
        "fp16: 2x smaller, computes in fp16 (fast on GPU; on CPU usually no faster than fp32)"
    ),
    spec_pb2.QUANTIZATION_METHOD_BF16: (
        "bf16: 2x smaller, computes in bf16 (fast on GPU and CPUs with AMX/AVX512-BF16; else no faster)"
    ),
}
_CASTS: dict[int, str] = {
    spec_pb2.QUANTIZATION_METHOD_FP16: "fp16",
    spec_pb2.QUANTIZATION_METHOD_BF16: "bf16",
}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def quantize_per_channel(weight: torch.Tensor, bits: int, symmetric: bool) -> QuantizedTensor:
    """Per-row quantization. Symmetric: codes in [-(2^(b-1)-1), 2^(b-1)-1],
    scale = max|w| / qmax. Asymmetric: codes in [0, 2^b - 1] over [min(w,0),
    max(w,0)] with an integer zero point, so 0 stays exactly representable
    (pruned weights remain zero). Either way |w - dequant| <= scale / 2."""
    w = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)
        zero_point = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    else:
        levels = 2**bits - 1
        low = w.amin(dim=1).clamp_max(0.0)
        high = w.amax(dim=1).clamp_min(0.0)
        scale = (high - low) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.clamp(torch.round(-low / scale), 0, levels).to(torch.int32)
        codes_i = torch.round(w / scale[:, None]).to(torch.int32) + zero_point[:, None]
        codes = torch.clamp(codes_i, 0, levels).to(torch.uint8)
    return QuantizedTensor(codes.reshape(weight.shape), scale, zero_point, bits, symmetric)


@dataclass
class QuantizationResult:
    quantized: dict[str, QuantizedTensor]  # state-dict name -> codes
    runtime: str
    note: str


@torch.no_grad()
def quantize_model(model: nn.Module, method: int, bits: int) -> QuantizationResult:
    """Quantize every Linear and Conv2d weight (or cast every parameter) and write
    the dequantized values back into ``model``."""
    if method in _CASTS:
        runtime = _CASTS[method]
        for tensor in model.parameters():  # input normalization is buffers, kept in fp32
            tensor.copy_(tensor.to(_DTYPES[runtime]).to(tensor.dtype))
        return QuantizationResult({}, runtime, NOTES[method])
    if method == spec_pb2.QUANTIZATION_METHOD_KBIT_WEIGHT_ONLY:
        width, symmetric, runtime = bits, False, "fp32"
        note = (
            f"{bits}-bit weight-only: codes bit-packed on disk (~{32 / bits:.0f}x smaller weights), "
            "dequantized to fp32 on load (no speed-up)"
        )
    elif method in NOTES:
        width, symmetric, note = 8, True, NOTES[method]
        runtime = "int8_dynamic" if method == spec_pb2.QUANTIZATION_METHOD_INT8_DYNAMIC else "fp32"
    else:
        raise ValueError(f"unknown quantization method {method}")
    quantized: dict[str, QuantizedTensor] = {}
    for name, module in weight_layers(model).items():
        q = quantize_per_channel(module.weight, width, symmetric)
        module.weight.copy_(q.dequantize().to(module.weight.device))
        quantized[f"{name}.weight"] = q
    return QuantizationResult(quantized, runtime, note)
