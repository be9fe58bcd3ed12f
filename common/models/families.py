"""Model families: each built-in architecture is one module under common/models
implementing :class:`Family`, found here by its ``Architecture`` oneof member.
Code outside common/models asks this registry and never names a family, so a
new family is a proto member, one module and its tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import nn

from common.api.modelfleet.common.v1 import model_pb2
from common.errors import InvalidArgument
from common.models import cnn, mlp
from common.models.pruning import Kept
from common.models.sizes import Specs


class Family(Protocol):
    """One architecture family; ``arch`` is its member of ``model_pb2.Architecture``."""

    name: str

    def default(self) -> Any:
        """The architecture a training spec without one gets (sizes from the dataset)."""

    def validate(self, arch: Any, where: str, sizes_from_dataset: bool = False) -> None:
        """InvalidArgument naming the bad field; with ``sizes_from_dataset``, the
        input and output sizes may still be 0 (filled by ``fit_to_dataset``)."""

    def fit_to_dataset(
        self, arch: Any, example_shape: Sequence[int], outputs: int, where: str, dataset: str
    ) -> None:
        """Fill the sizes left at 0 from a dataset's example shape and output count;
        InvalidArgument when set sizes disagree with it."""

    def parameter_count(self, arch: Any) -> int:
        """Parameters the built model holds, computed without building it."""

    def input_width(self, arch: Any) -> int:
        """Input features per example (what a normalization must match)."""

    def build(self, arch: Any, norm: model_pb2.Normalization | None = None) -> nn.Module:
        """A fresh module taking raw inputs: the dataset's input transform ``norm``
        (normalization, imputation) baked in, then the trainable part."""

    def hidden_units(self, arch: Any) -> int:
        """How many units (neurons, channels) structured pruning may remove from; 0: none."""

    def prune_units(
        self, model: nn.Module, sparsity: float, norm: int
    ) -> tuple[nn.Module, Any, dict[str, Kept]]:
        """A smaller copy of a built ``model``: each prunable layer's ``sparsity``
        share of units with the smallest L``norm`` weight norm physically removed.
        Returns it, its architecture, and per weight (state-dict key) what was kept."""

    def trainable(self, model: nn.Module) -> nn.Module:
        """The part of a built model that training updates; it takes transformed
        inputs (what the dataset's shards hold)."""

    def tensor_specs(self, arch: Any) -> Specs:
        """The served model's input and output tensors."""


FAMILIES: dict[str, Family] = {family.name: family for family in (mlp.FAMILY, cnn.FAMILY)}
DEFAULT = mlp.FAMILY.name


def family_of(arch: model_pb2.Architecture, where: str = "architecture") -> tuple[Family, Any]:
    """The family of ``arch`` and its member message; InvalidArgument when unset or unknown."""
    name = arch.WhichOneof("family")
    family = FAMILIES.get(name or "")
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise InvalidArgument(f"{where} family {name!r} is not supported (known: {known})")
    return family, getattr(arch, name or "")


def default_architecture() -> model_pb2.Architecture:
    family = FAMILIES[DEFAULT]
    return model_pb2.Architecture(**{family.name: family.default()})


def tensor_specs(arch: model_pb2.Architecture) -> Specs:
    family, member = family_of(arch)
    return family.tensor_specs(member)


def check_parameter_budget(arch: model_pb2.Architecture, budget: int, where: str) -> None:
    """InvalidArgument before anything is allocated when ``arch`` exceeds ``budget``
    parameters (MODELFLEET_MAX_MODEL_PARAMETERS): such a model can never fit, so it
    is refused at submit instead of failing every attempt."""
    family, member = family_of(arch, where)
    count = family.parameter_count(member)
    if count > budget:
        raise InvalidArgument(
            f"{where}.{family.name} has {count:,} parameters, above this deployment's budget of {budget:,} "
            "(MODELFLEET_MAX_MODEL_PARAMETERS)"
        )
