"""Applies a job's steps, in order, to a copy of the source model (any built-in
family) and produces
what gets stored: float tensors (zeros where pruned), quantized codes and the
runtime, plus human-readable step descriptions and notes for the report."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.compression.v1 import compression_spec_pb2 as spec_pb2
from common.models.compressed import CompressedTensors
from common.models.families import Family, family_of
from services.compression.ops.finetune import FinetuneConfig, TrainData, finetune
from services.compression.ops.l1ball import project_model_weights
from services.compression.ops.magnitude import prune_magnitude
from services.compression.ops.quantize import quantize_model

log = logging.getLogger(__name__)

# (step index, epoch, loss) after each fine-tuning epoch; may raise to cancel.
EpochHook = Callable[[int, int, float], None]
# (step index, description) after each step; may raise to cancel.
StepHook = Callable[[int, str], None]


@dataclass
class PipelineResult:
    model: torch.nn.Module  # float32, dequantized weights: what the stored artifact computes
    bundle: CompressedTensors
    steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _State:
    family: Family
    arch: model_pb2.Architecture
    model: torch.nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> kept entries

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, mask in self.masks.items():
            self.model.get_parameter(name).mul_(mask)

    def body(self) -> torch.nn.Module:
        return self.family.trainable(self.model)


def describe(step: spec_pb2.CompressionStep) -> str:
    kind = step.WhichOneof("step")
    if kind == "magnitude_pruning":
        p = step.magnitude_pruning
        scope = "global" if p.scope == spec_pb2.PRUNING_SCOPE_GLOBAL else "per-layer"
        return f"magnitude pruning to {p.sparsity:g} sparsity ({scope})"
    if kind == "structured_pruning":
        s = step.structured_pruning
        units = "hidden units (neurons, channels)"
        return f"structured pruning of {s.sparsity:g} of {units} by L{s.norm or 2} norm"
    if kind == "l1_constrained_finetune":
        c = step.l1_constrained_finetune
        return f"L1-constrained fine-tune (radius {c.radius:g}, {c.epochs} epochs, lr {c.learning_rate:g})"
    if kind == "finetune":
        f = step.finetune
        kd = f", distillation weight {f.distillation_weight:g} T={f.temperature or 2.0:g}"
        return f"fine-tune ({f.epochs} epochs, lr {f.learning_rate:g}{kd if f.distillation_weight else ''})"
    q = step.quantization
    name = spec_pb2.QuantizationMethod.Name(q.method).removeprefix("QUANTIZATION_METHOD_").lower()
    return f"quantization {name}" + (
        f" {q.bits} bits" if q.method == spec_pb2.QUANTIZATION_METHOD_KBIT_WEIGHT_ONLY else ""
    )


def run_pipeline(
    source: torch.nn.Module,
    arch: model_pb2.Architecture,
    normalization: model_pb2.Normalization,
    steps: Sequence[spec_pb2.CompressionStep],
    train_data: Callable[[], TrainData],
    *,
    seed: int = 0,
    on_step: StepHook = lambda index, text: None,
    on_epoch: EpochHook = lambda index, epoch, loss: None,
) -> PipelineResult:
    """``source`` is a built model of ``arch``'s family; steps must already be
    validated (services.compression.spec)."""
    torch.manual_seed(seed)
    family, _ = family_of(arch)
    state = _State(family, copy.deepcopy(arch), copy.deepcopy(source).eval())
    teacher = copy.deepcopy(family.trainable(source)).eval().requires_grad_(False)
    quantized, runtime = {}, "fp32"
    result_steps: list[str] = []
    notes: list[str] = []
    for index, step in enumerate(steps):
        kind = step.WhichOneof("step")
        if kind == "magnitude_pruning":
            p = step.magnitude_pruning
            masks = prune_magnitude(state.model, p.sparsity, p.scope == spec_pb2.PRUNING_SCOPE_GLOBAL)
            state.masks = {i: m & state.masks[i] if i in state.masks else m for i, m in masks.items()}
            notes.append(
                "unstructured sparsity: smaller on disk (bitmask + non-zeros); dense kernels, no speed-up"
            )
        elif kind == "structured_pruning":
            s = step.structured_pruning
            state.model, member, kept = family.prune_units(state.model, s.sparsity, s.norm or 2)
            getattr(state.arch, family.name).CopyFrom(member)
            state.masks = {n: kept[n].slice(m) if n in kept else m for n, m in state.masks.items()}
            notes.append("structured pruning: smaller dense layers, fewer FLOPs at every batch size")
        elif kind in ("l1_constrained_finetune", "finetune"):
            _finetune_step(state, step, index, train_data(), teacher, seed, on_epoch)
            if kind == "l1_constrained_finetune":
                notes.append(
                    "L1 constraint: weights projected onto the L1 ball; the zeros it makes shrink the file"
                )
        else:
            q = step.quantization
            outcome = quantize_model(state.model, q.method, q.bits)
            quantized, runtime = outcome.quantized, outcome.runtime
            notes.append(outcome.note)
        text = describe(step)
        result_steps.append(text)
        log.info("compression step done", extra={"step": index, "what": text})
        on_step(index, text)
    model = state.model.eval()
    tensors = {name: t.detach().to("cpu", torch.float32) for name, t in model.state_dict().items()}
    bundle = CompressedTensors(state.arch, normalization, tensors, quantized, runtime)
    return PipelineResult(model, bundle, result_steps, notes)


def _finetune_step(
    state: _State,
    step: spec_pb2.CompressionStep,
    index: int,
    data: TrainData,
    teacher: torch.nn.Module,
    seed: int,
    on_epoch: EpochHook,
) -> None:
    if step.WhichOneof("step") == "l1_constrained_finetune":
        c = step.l1_constrained_finetune
        config = FinetuneConfig(c.epochs, c.learning_rate, c.batch_size, sgd=True, seed=seed)

        def project() -> None:
            state.apply_masks()
            project_model_weights(state.model, c.radius)

        project()  # start feasible: the constraint holds before the first step too
        after_step = project
    else:
        f = step.finetune
        config = FinetuneConfig(
            f.epochs,
            f.learning_rate,
            f.batch_size,
            distillation_weight=f.distillation_weight,
            temperature=f.temperature or 2.0,
            seed=seed,
        )
        after_step = state.apply_masks
    device = next(state.model.parameters()).device
    teacher = teacher.to(device)
    finetune(
        state.body(),
        data,
        config,
        teacher=teacher,
        after_step=after_step,
        after_epoch=lambda epoch, loss: on_epoch(index, epoch, loss),
    )
