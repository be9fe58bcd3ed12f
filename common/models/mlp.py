"""The MLP family: Linear layers with an activation (and dropout) between them,
preceded by the input normalization of the dataset it was trained on."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from common.api.modelfleet.common.v1 import model_pb2
from common.errors import InvalidArgument

_ACTIVATIONS: dict[int, type[nn.Module]] = {
    model_pb2.ACTIVATION_UNSPECIFIED: nn.ReLU,
    model_pb2.ACTIVATION_RELU: nn.ReLU,
    model_pb2.ACTIVATION_GELU: nn.GELU,
    model_pb2.ACTIVATION_TANH: nn.Tanh,
    model_pb2.ACTIVATION_SIGMOID: nn.Sigmoid,
    model_pb2.ACTIVATION_SILU: nn.SiLU,
}


class Normalize(nn.Module):
    """y = (x - shift) / scale, per feature, after missing (NaN) inputs take their
    ``fill`` value when the dataset was imputed; buffers travel with the weights."""

    shift: torch.Tensor
    scale: torch.Tensor
    fill: torch.Tensor | None

    def __init__(self, num_features: int, impute: bool = False) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(num_features))
        self.register_buffer("fill", torch.zeros(num_features) if impute else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fill is not None:
            x = torch.where(torch.isnan(x), self.fill, x)
        return (x - self.shift) / self.scale


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
                layers.append(_ACTIVATIONS[arch.activation]())
                if arch.dropout > 0:
                    layers.append(nn.Dropout(arch.dropout))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.norm(x))

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def set_normalization(self, norm: model_pb2.Normalization) -> None:
        """Copy a dataset's normalization into the model's buffers."""
        if not isinstance(self.norm, Normalize):
            raise InvalidArgument("model was built without normalization")
        if norm.shift:  # kind NONE with only a fill keeps shift 0, scale 1
            self.norm.shift.copy_(torch.tensor(list(norm.shift), dtype=torch.float32))
            self.norm.scale.copy_(torch.tensor(list(norm.scale), dtype=torch.float32))
        if self.norm.fill is not None:
            self.norm.fill.copy_(torch.tensor(list(norm.fill), dtype=torch.float32))


def validate_mlp(arch: model_pb2.MlpArchitecture, where: str = "architecture.mlp") -> None:
    if arch.input_size <= 0:
        raise InvalidArgument(f"{where}.input_size must be positive, got {arch.input_size}")
    if arch.output_size <= 0:
        raise InvalidArgument(f"{where}.output_size must be positive, got {arch.output_size}")
    for i, width in enumerate(arch.hidden_sizes):
        if width <= 0:
            raise InvalidArgument(f"{where}.hidden_sizes[{i}] must be positive, got {width}")
    if arch.activation not in _ACTIVATIONS:
        raise InvalidArgument(f"{where}.activation {arch.activation} is unknown")
    if not 0.0 <= arch.dropout < 1.0:
        raise InvalidArgument(f"{where}.dropout must be in [0, 1), got {arch.dropout}")


def parameter_count(arch: model_pb2.MlpArchitecture) -> int:
    """Weights and biases of the MLP ``arch`` describes, without building it."""
    widths = [arch.input_size, *arch.hidden_sizes, arch.output_size]
    return sum((n_in + 1) * n_out for n_in, n_out in itertools.pairwise(widths))


def check_parameter_budget(arch: model_pb2.MlpArchitecture, budget: int, where: str) -> None:
    """InvalidArgument before anything is allocated when ``arch`` exceeds ``budget``
    parameters (MODELFLEET_MAX_MODEL_PARAMETERS): such a model can never fit, so it
    is refused at submit instead of failing every attempt."""
    count = parameter_count(arch)
    if count > budget:
        raise InvalidArgument(
            f"{where} has {count:,} parameters, above this deployment's budget of {budget:,} "
            "(MODELFLEET_MAX_MODEL_PARAMETERS)"
        )


def is_normalized(norm: model_pb2.Normalization) -> bool:
    """Whether ``norm`` transforms inputs: a shift and scale, or a missing-value fill."""
    return norm.kind in (model_pb2.NORMALIZATION_KIND_ZSCORE, model_pb2.NORMALIZATION_KIND_MINMAX) or bool(
        norm.fill
    )


def build_model(arch: model_pb2.Architecture, norm: model_pb2.Normalization | None = None) -> MLP:
    """A freshly initialised model of a built-in family."""
    family = arch.WhichOneof("family")
    if family == "mlp":
        normalized = norm is not None and is_normalized(norm)
        model = MLP(
            arch.mlp, normalized=normalized, impute=normalized and norm is not None and bool(norm.fill)
        )
        if normalized and norm is not None:
            model.set_normalization(norm)
        return model
    raise InvalidArgument(f"architecture family {family!r} is not supported (known: mlp)")
