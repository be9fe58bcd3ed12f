"""The model-family registry: every Architecture member has a family, and each
family keeps its contract (the MLP is the first; new families add cases here)."""

from __future__ import annotations

import pytest
import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.errors import InvalidArgument
from common.models.families import (
    FAMILIES,
    check_parameter_budget,
    default_architecture,
    family_of,
    tensor_specs,
)

ONEOF = model_pb2.Architecture.DESCRIPTOR.oneofs_by_name["family"]


def test_every_architecture_member_has_a_family() -> None:
    assert {field.name for field in ONEOF.fields} == set(FAMILIES)
    with pytest.raises(
        InvalidArgument, match=r"spec\.architecture family None is not supported \(known: cnn, mlp\)"
    ):
        family_of(model_pb2.Architecture(), "spec.architecture")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_contract(name: str) -> None:
    family = FAMILIES[name]
    arch = model_pb2.Architecture(**{name: family.default()})
    _, member = family_of(arch)
    family.validate(member, "a", sizes_from_dataset=True)  # sizes still 0: fine
    with pytest.raises(InvalidArgument, match=rf"a\.{name}\."):
        family.validate(member, "a")  # but not for a model to build
    family.fit_to_dataset(member, [1, 8, 8], 10, "a", "dataset d version 1")
    assert family.input_width(member) == 64
    with pytest.raises(InvalidArgument, match="dataset d version 1 has 12 features"):
        family.fit_to_dataset(member, [12], 10, "a", "dataset d version 1")
    model = family.build(member).eval()
    assert family.parameter_count(member) == sum(p.numel() for p in model.parameters())
    trainable = family.trainable(model)
    assert {id(p) for p in trainable.parameters()} == {id(p) for p in model.parameters()}
    inputs, outputs = tensor_specs(arch)
    x = torch.zeros([2, *[d for d in inputs[0].shape[1:]]])
    assert list(model(x).shape) == [2, *outputs[0].shape[1:]]
    norm = model_pb2.Normalization(
        kind=model_pb2.NORMALIZATION_KIND_ZSCORE, shift=[1.0] * 64, scale=[2.0] * 64
    )
    normalized = family.build(member, norm).eval()  # the dataset's transform baked in front
    family.trainable(normalized).load_state_dict(trainable.state_dict())
    raw = torch.randn(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(normalized(raw), model((raw - 1.0) / 2.0))


def test_parameter_budget_names_the_family() -> None:
    arch = default_architecture()
    _, member = family_of(arch)
    member.input_size, member.output_size = 1000, 10
    with pytest.raises(
        InvalidArgument, match=r"spec\.architecture\.mlp has 64,714 parameters, above .* 1,000"
    ):
        check_parameter_budget(arch, 1000, "spec.architecture")
    check_parameter_budget(arch, 64_714, "spec.architecture")
