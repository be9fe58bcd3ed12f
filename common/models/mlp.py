"""The MLP family: Linear layers with an activation (and dropout) between them,
preceded by the input normalization of the dataset it was trained on."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from common.api.modelfleet.common.v1 import model_pb2
from common.errors import InvalidArgument
from common.models.activations import ACTIVATIONS
from common.models.inputs import Normalize, input_transform
from common.models.pruning import Kept, units_to_keep
from common.models.sizes import Specs, fit_size, io_specs


class MLP(nn.Module):
    """State-dict keys: ``norm.shift``, ``norm.scale`` (when normalized), ``norm.fill``
    (when imputed) and ``layers.<i>.weight|bias`` for the Linear layers of ``layers``."""

    def __init__(
        self, arch: model_pb2.MlpArchitecture, normalized: bool = False, impute: bool = False
    ) -> None:
        super().__init__()
        validate_mlp(arch)
        self.arch = arch
        self.norm: nn.Module = Normalize(arch.input_size, impute) if normalized else nn.Identity()
        widths = [arch.input_size, *arch.hidden_sizes, arch.output_size]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[arch.activation]())
                if arch.dropout > 0:
                    layers.append(nn.Dropout(arch.dropout))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.norm(x))

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]


def validate_mlp(arch: model_pb2.MlpArchitecture, where: str = "architecture.mlp") -> None:
    if arch.input_size <= 0:
        raise InvalidArgument(f"{where}.input_size must be positive, got {arch.input_size}")
    if arch.output_size <= 0:
        raise InvalidArgument(f"{where}.output_size must be positive, got {arch.output_size}")
    for i, width in enumerate(arch.hidden_sizes):
        if width <= 0:
            raise InvalidArgument(f"{where}.hidden_sizes[{i}] must be positive, got {width}")
    if arch.activation not in ACTIVATIONS:
        raise InvalidArgument(f"{where}.activation {arch.activation} is unknown")
    if not 0.0 <= arch.dropout < 1.0:
        raise InvalidArgument(f"{where}.dropout must be in [0, 1), got {arch.dropout}")


def parameter_count(arch: model_pb2.MlpArchitecture) -> int:
    """Weights and biases of the MLP ``arch`` describes, without building it."""
    widths = [arch.input_size, *arch.hidden_sizes, arch.output_size]
    return sum((n_in + 1) * n_out for n_in, n_out in itertools.pairwise(widths))


def build_model(arch: model_pb2.Architecture, norm: model_pb2.Normalization | None = None) -> MLP:
    """A freshly initialised MLP (``arch.mlp``) with the input transform ``norm``."""
    family = arch.WhichOneof("family")
    if family == "mlp":
        model = MLP(arch.mlp)
        model.norm = input_transform(arch.mlp.input_size, norm)
        return model
    raise InvalidArgument(f"architecture family {family!r} is not supported (known: mlp)")


class MlpFamily:
    """The MLP as a model family (see common.models.families)."""

    name = "mlp"
    default_hidden_sizes = (64,)

    def default(self) -> model_pb2.MlpArchitecture:
        return model_pb2.MlpArchitecture(hidden_sizes=self.default_hidden_sizes)

    def validate(self, arch: model_pb2.MlpArchitecture, where: str, sizes_from_dataset: bool = False) -> None:
        where = f"{where}.{self.name}"
        if not sizes_from_dataset:
            validate_mlp(arch, where)
            return
        for field in ("input_size", "output_size"):
            if getattr(arch, field) < 0:
                raise InvalidArgument(
                    f"{where}.{field} must be >= 0 (0: from the dataset), got {getattr(arch, field)}"
                )
        probe = model_pb2.MlpArchitecture()
        probe.CopyFrom(arch)
        probe.input_size = probe.input_size or 1
        probe.output_size = probe.output_size or 1
        validate_mlp(probe, where)

    def fit_to_dataset(
        self,
        arch: model_pb2.MlpArchitecture,
        example_shape: Sequence[int],
        outputs: int,
        where: str,
        dataset: str,
    ) -> None:
        where = f"{where}.{self.name}"
        features = math.prod(example_shape)  # an image is its flattened pixels
        fit_size(arch, "input_size", features, where, f"{dataset} has {features} features")
        fit_size(arch, "output_size", outputs, where, f"{dataset} needs {outputs}")
        validate_mlp(arch, where)

    def parameter_count(self, arch: model_pb2.MlpArchitecture) -> int:
        return parameter_count(arch)

    def input_width(self, arch: model_pb2.MlpArchitecture) -> int:
        return int(arch.input_size)

    def build(self, arch: model_pb2.MlpArchitecture, norm: model_pb2.Normalization | None = None) -> MLP:
        return build_model(model_pb2.Architecture(mlp=arch), norm)

    def hidden_units(self, arch: model_pb2.MlpArchitecture) -> int:
        return sum(arch.hidden_sizes)

    @torch.no_grad()
    def prune_units(
        self, model: nn.Module, sparsity: float, norm: int
    ) -> tuple[MLP, model_pb2.MlpArchitecture, dict[str, Kept]]:
        """Each hidden layer's weakest neurons (incoming weight norm) removed: the
        neuron's row in its Linear and its column in the next."""
        if not isinstance(model, MLP):
            raise InvalidArgument(f"not an MLP: {type(model).__name__}")
        indices = [i for i, m in enumerate(model.layers) if isinstance(m, nn.Linear)]
        source = model.linears()
        kept = [units_to_keep(layer.weight, sparsity, norm) for layer in source[:-1]]
        arch = model_pb2.MlpArchitecture()
        arch.CopyFrom(model.arch)
        arch.hidden_sizes[:] = [int(k.numel()) for k in kept]
        smaller = MLP(arch)
        smaller.norm = copy.deepcopy(model.norm)
        shapes: dict[str, Kept] = {}
        for i, (old, new) in enumerate(zip(source, smaller.linears(), strict=True)):
            cut = Kept(rows=kept[i] if i < len(kept) else None, cols=kept[i - 1] if i > 0 else None)
            new.weight.copy_(cut.slice(old.weight))
            new.bias.copy_(Kept(rows=cut.rows).slice(old.bias))
            shapes[f"layers.{indices[i]}.weight"] = cut
        smaller.train(model.training)
        return smaller.to(source[0].weight.device), arch, shapes

    def trainable(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, MLP):
            raise InvalidArgument(f"not an MLP: {type(model).__name__}")
        return model.layers

    def tensor_specs(self, arch: model_pb2.MlpArchitecture) -> Specs:
        """``input`` FP32 [-1, in] and ``output`` FP32 [-1, out]."""
        return io_specs([arch.input_size], arch.output_size)


FAMILY = MlpFamily()
