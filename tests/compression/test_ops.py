"""Pure-torch compression operations against independent references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.compression.v1 import compression_spec_pb2 as spec_pb2
from common.models.compressed import pack_bits, unpack_bits
from common.models.families import FAMILIES
from common.models.mlp import MLP, build_model
from services.compression.ops.l1ball import project_l1_ball, project_model_weights
from services.compression.ops.magnitude import keep_count, magnitude_masks, prune_magnitude, topk_mask
from services.compression.ops.quantize import quantize_model, quantize_per_channel

torch.set_num_threads(1)


def _mlp(hidden: list[int], seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    arch = model_pb2.Architecture(
        mlp=model_pb2.MlpArchitecture(input_size=6, hidden_sizes=hidden, output_size=3)
    )
    return build_model(arch)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_magnitude_keeps_exactly_the_k_largest(sparsity: float) -> None:
    w = torch.randn(17, 13, generator=torch.Generator().manual_seed(1))
    mask = topk_mask(w.abs(), keep_count(w.numel(), sparsity))
    k = round((1 - sparsity) * w.numel())
    assert int(mask.sum()) == k
    reference = set(np.argsort(-w.abs().reshape(-1).numpy(), kind="stable")[:k].tolist())
    assert set(torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()) == reference


def test_magnitude_ties_are_deterministic_not_random() -> None:
    w = torch.ones(4, 5)  # all tied: the lowest flat indices survive, every time
    masks = [topk_mask(w, 7) for _ in range(3)]
    assert all(torch.equal(m, masks[0]) for m in masks)
    assert torch.nonzero(masks[0].reshape(-1)).reshape(-1).tolist() == list(range(7))


def test_global_and_per_layer_scopes_differ_as_defined() -> None:
    small = torch.full((4, 4), 0.01) + torch.rand(4, 4) * 1e-3
    large = torch.full((4, 4), 10.0) + torch.rand(4, 4)
    per_layer = magnitude_masks([small, large], 0.5, global_scope=False)
    assert [int(m.sum()) for m in per_layer] == [8, 8]
    glob = magnitude_masks([small, large], 0.5, global_scope=True)
    # Globally the 16 largest of 32 are exactly the large layer's weights.
    assert [int(m.sum()) for m in glob] == [0, 16]


def test_prune_magnitude_zeroes_model_weights_in_place_and_keeps_biases() -> None:
    model = _mlp([8, 8])
    biases = [m.bias.detach().clone() for m in model.linears()]
    masks = prune_magnitude(model, 0.75, global_scope=False)
    for layer, bias in zip(model.linears(), biases, strict=True):
        assert int(torch.count_nonzero(layer.weight)) == round(0.25 * layer.weight.numel())
        assert torch.equal(layer.bias, bias)
    assert sorted(masks) == ["layers.0.weight", "layers.2.weight", "layers.4.weight"]


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    arch = model_pb2.CnnArchitecture(
        input_shape=[2, 6, 6],
        blocks=[
            model_pb2.ConvBlock(out_channels=10, batch_norm=True, pooling=model_pb2.POOLING_MAX),
            model_pb2.ConvBlock(out_channels=8, kernel_size=1),
        ],
        output_size=3,
    )
    model = FAMILIES["cnn"].build(arch)
    for name, buffer in model.named_buffers():  # BatchNorm statistics pruning must carry
        if "running" in name:
            buffer.copy_(torch.rand(buffer.shape) + 0.5)
    return model.eval()


@pytest.mark.parametrize("family", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", [1, 2])
def test_structured_pruning_shrinks_layers_and_keeps_the_function_of_kept_units(
    family: str, norm: int
) -> None:
    model = _mlp([10, 8]).eval() if family == "mlp" else _cnn()
    smaller, arch, kept = FAMILIES[family].prune_units(model, 0.5, norm)
    sizes = list(arch.hidden_sizes) if family == "mlp" else [b.out_channels for b in arch.blocks]
    assert sizes == [5, 4]
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())
    # The smaller model is exactly a model of its new architecture.
    FAMILIES[family].build(arch).load_state_dict(smaller.state_dict(), strict=True)
    for name, cut in kept.items():
        old = model.get_parameter(name)
        assert smaller.get_parameter(name).shape == cut.slice(old).shape
        if cut.rows is not None:  # kept units are the largest-norm rows
            scores = torch.linalg.vector_norm(old.reshape(old.shape[0], -1), ord=norm, dim=1)
            assert set(cut.rows.tolist()) == set(torch.topk(scores, len(cut.rows)).indices.tolist())
    # The reference: the original with the removed units' outgoing weights zeroed.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, cut in kept.items():
            if cut.cols is not None:
                weight = reference.get_parameter(name)
                dropped = torch.ones(weight.shape[1], dtype=torch.bool)
                dropped[cut.cols] = False
                weight[:, dropped] = 0
    x = torch.randn(32, 6) if family == "mlp" else torch.randn(32, 2, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(smaller(x), reference(x))


def _bisection_projection(v: np.ndarray, radius: float) -> np.ndarray:
    """Independent reference: KKT says w = sign(v) max(|v| - t, 0) with t >= 0
    the root of sum(max(|v| - t, 0)) = radius; find t by bisection."""
    a = np.abs(v)
    if a.sum() <= radius:
        return v.copy()
    lo, hi = 0.0, float(a.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(a - mid, 0).sum() > radius:
            lo = mid
        else:
            hi = mid
    return np.sign(v) * np.maximum(a - (lo + hi) / 2, 0)


@pytest.mark.parametrize("seed", range(6))
def test_l1_projection_is_the_euclidean_projection(seed: int) -> None:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=rng.integers(1, 12)) * 3
    radius = float(rng.uniform(0.1, 5.0))
    w = project_l1_ball(torch.from_numpy(v), radius).numpy()
    assert np.allclose(w, _bisection_projection(v, radius), atol=1e-9)
    if np.abs(v).sum() > radius:
        assert np.isclose(np.abs(w).sum(), radius)  # lands on the ball's surface
    else:
        assert np.array_equal(w, v)
    # No feasible point is closer (a brute-force sample of the ball).
    best = np.linalg.norm(w - v)
    for _ in range(500):
        u = rng.normal(size=v.shape)
        u *= rng.uniform(0, radius) / np.abs(u).sum()
        assert np.linalg.norm(u - v) >= best - 1e-12


def test_project_model_weights_constrains_the_whole_weight_vector() -> None:
    model = _mlp([8])
    project_model_weights(model, 2.5)
    total = sum(float(m.weight.detach().abs().sum()) for m in model.linears())
    assert total == pytest.approx(2.5, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_dequantize_error_is_within_half_a_step(bits: int, symmetric: bool) -> None:
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(bits))
    w[3] = 0  # an all-zero channel must not divide by zero
    q = quantize_per_channel(w, bits, symmetric)
    levels = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    assert int(q.codes.max()) <= levels
    error = (q.dequantize() - w).abs()
    assert torch.all(error <= q.scale[:, None] / 2 * (1 + 1e-5) + 1e-7)
    assert torch.equal(q.dequantize()[3], torch.zeros(40))
    # Zero stays exactly zero (pruned weights stay pruned).
    sparse = w * (torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    assert torch.all(quantize_per_channel(sparse, bits, symmetric).dequantize()[sparse == 0] == 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7])
def test_bit_packing_round_trips_and_is_dense(bits: int) -> None:
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=101).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.nbytes == -(-101 * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, 101), codes)


def test_quantization_is_written_back_into_the_model() -> None:
    model = _mlp([8])
    before = [m.weight.detach().clone() for m in model.linears()]
    out = quantize_model(model, spec_pb2.QUANTIZATION_METHOD_KBIT_WEIGHT_ONLY, 3)
    for i, (layer, old) in enumerate(zip(model.linears(), before, strict=True)):
        q = out.quantized[f"layers.{2 * i}.weight"]
        assert torch.equal(layer.weight, q.dequantize())
        assert not torch.equal(layer.weight, old)
        assert len(torch.unique(layer.weight[0])) <= 8
