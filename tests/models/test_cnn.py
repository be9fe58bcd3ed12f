"""The CNN family on its own: validation names the bad field, the parameter
count matches the built module, and rows and images give the same answer."""

from __future__ import annotations

import pytest
import torch

from common.api.modelfleet.common.v1 import model_pb2
from common.errors import InvalidArgument
from common.models.cnn import FAMILY, validate_cnn


def _arch(**changes: object) -> model_pb2.CnnArchitecture:
    arch = FAMILY.default()
    arch.input_shape[:] = [3, 8, 8]
    arch.output_size = 4
    for name, value in changes.items():
        if name.startswith("block0_"):
            setattr(arch.blocks[0], name.removeprefix("block0_"), value)
        else:
            setattr(arch, name, value)
    return arch


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"block0_kernel_size": 4}, r"blocks\[0\]\.kernel_size must be odd"),
        ({"block0_kernel_size": -1}, r"blocks\[0\]\.kernel_size must be odd"),
        ({"block0_out_channels": 0}, r"blocks\[0\]\.out_channels must be positive"),
        ({"block0_stride": 9}, r"blocks\[0\]\.stride must be in \[1, 8\]"),
        ({"block0_pooling": 99}, r"blocks\[0\]\.pooling 99 is unknown"),
        ({"block0_stride": 8}, r"blocks\[0\] leaves no spatial positions for input \[3, 8, 8\]"),
        ({"global_pooling": model_pb2.POOLING_NONE}, r"global_pooling must be MAX or AVG"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"output_size": 0}, r"output_size must be positive"),
        ({"activation": 42}, r"activation 42 is unknown"),
    ],
)
def test_bad_architectures_name_the_field(changes: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"a\.cnn\.{match}"):
        FAMILY.validate(_arch(**changes), "a")


def test_input_shape_and_blocks_are_required() -> None:
    arch = _arch()
    arch.input_shape[:] = [8, 8]
    with pytest.raises(InvalidArgument, match=r"input_shape must be \[channels, height, width\]"):
        validate_cnn(arch)
    with pytest.raises(InvalidArgument, match="blocks must list at least one"):
        validate_cnn(model_pb2.CnnArchitecture(input_shape=[1, 8, 8], output_size=2))


def test_sizes_from_the_dataset_and_a_tabular_dataset_is_refused() -> None:
    arch = FAMILY.default()
    FAMILY.validate(arch, "spec.architecture", sizes_from_dataset=True)
    with pytest.raises(InvalidArgument, match=r"the cnn family trains on images .* has 64 features"):
        FAMILY.fit_to_dataset(arch, [64], 10, "spec.architecture", "dataset d version 1")
    FAMILY.fit_to_dataset(arch, [3, 16, 16], 10, "spec.architecture", "dataset d version 1")
    assert list(arch.input_shape) == [3, 16, 16] and arch.output_size == 10
    with pytest.raises(InvalidArgument, match=r"input_shape is \[3, 16, 16\] but .* has images \[1, 8, 8\]"):
        FAMILY.fit_to_dataset(arch, [1, 8, 8], 10, "spec.architecture", "dataset d version 1")


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("pooling", [model_pb2.POOLING_MAX, model_pb2.POOLING_AVG, model_pb2.POOLING_NONE])
def test_parameter_count_and_shapes(batch_norm: bool, pooling: int) -> None:
    arch = _arch(global_pooling=model_pb2.POOLING_MAX)
    for block in arch.blocks:
        block.batch_norm = batch_norm
        block.pooling = pooling  # type: ignore[assignment]
    arch.blocks.add(out_channels=5, kernel_size=5, stride=2)
    model = FAMILY.build(arch).eval()
    assert FAMILY.parameter_count(arch) == sum(p.numel() for p in model.parameters())
    images = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        out = model(images)
        assert out.shape == (3, 4)
        # The trainable body takes the data path's flattened rows too.
        torch.testing.assert_close(FAMILY.trainable(model)(images.reshape(3, -1)), out)
