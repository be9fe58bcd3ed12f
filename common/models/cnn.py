"""The CNN family: convolution blocks (Conv2d, optional BatchNorm, activation,
optional pooling), global pooling and a Linear head, preceded by the input
transform of the image dataset it was trained on.

Images travel through the data path as flattened rows (C*H*W features, the
dataset's per-channel normalization repeated per pixel), so the trainable body
takes rows or images and reshapes to [B, C, H, W] itself.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from common.api.modelfleet.common.v1 import model_pb2
from common.errors import InvalidArgument
from common.models.activations import ACTIVATIONS
from common.models.inputs import input_transform
from common.models.pruning import Kept, units_to_keep
from common.models.sizes import Specs, fit_size, io_specs

_GLOBAL_POOLS = (model_pb2.POOLING_UNSPECIFIED, model_pb2.POOLING_MAX, model_pb2.POOLING_AVG)
_BLOCK_POOLS = (*_GLOBAL_POOLS, model_pb2.POOLING_NONE)


def kernel_of(block: model_pb2.ConvBlock) -> int:
    return block.kernel_size or 3


def stride_of(block: model_pb2.ConvBlock) -> int:
    return block.stride or 1


def pool_of(block: model_pb2.ConvBlock) -> int:
    """The pooling window (and stride) after ``block``; 1 when it does not pool."""
    if block.pooling in (model_pb2.POOLING_MAX, model_pb2.POOLING_AVG):
        return block.pool_size or 2
    return 1


class ConvBody(nn.Module):
    """The trainable part: takes [B, C*H*W] rows or [B, C, H, W] images.

    State-dict keys: ``blocks.<i>.conv.weight|bias``, ``blocks.<i>.bn.*`` (with
    BatchNorm) and ``head.weight|bias``."""

    def __init__(self, arch: model_pb2.CnnArchitecture) -> None:
        super().__init__()
        self.input_shape = tuple(int(d) for d in arch.input_shape)
        blocks: list[nn.Module] = []
        channels = self.input_shape[0]
        for spec in arch.blocks:
            block = nn.Sequential()
            kernel = kernel_of(spec)
            block.add_module(
                "conv",
                nn.Conv2d(
                    channels,
                    spec.out_channels,
                    kernel,
                    stride=stride_of(spec),
                    padding=kernel // 2,
                    bias=not spec.batch_norm,
                ),
            )
            if spec.batch_norm:
                block.add_module("bn", nn.BatchNorm2d(spec.out_channels))
            block.add_module("act", ACTIVATIONS[arch.activation]())
            window = pool_of(spec)
            if window > 1:
                pool = nn.MaxPool2d if spec.pooling == model_pb2.POOLING_MAX else nn.AvgPool2d
                block.add_module("pool", pool(window))
            blocks.append(block)
            channels = spec.out_channels
        self.blocks = nn.Sequential(*blocks)
        max_pool = arch.global_pooling == model_pb2.POOLING_MAX
        self.pool: nn.Module = nn.AdaptiveMaxPool2d(1) if max_pool else nn.AdaptiveAvgPool2d(1)
        self.dropout: nn.Module = nn.Dropout(arch.dropout) if arch.dropout > 0 else nn.Identity()
        self.head = nn.Linear(channels, arch.output_size)

    def convs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
        """Each block's convolution and its BatchNorm (None without)."""
        pairs = []
        for block in self.blocks:
            conv, bn = block.get_submodule("conv"), getattr(block, "bn", None)
            assert isinstance(conv, nn.Conv2d)
            pairs.append((conv, bn if isinstance(bn, nn.BatchNorm2d) else None))
        return pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)
        return self.head(self.dropout(self.pool(self.blocks(x)).flatten(1)))


class CNN(nn.Module):
    """State-dict keys: ``norm.*`` (as the MLP's, when normalized) and ``body.*``."""

    def __init__(self, arch: model_pb2.CnnArchitecture, norm: model_pb2.Normalization | None = None) -> None:
        super().__init__()
        validate_cnn(arch)
        self.arch = arch
        self.norm = input_transform(math.prod(arch.input_shape), norm)
        self.body = ConvBody(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x.reshape(x.shape[0], -1)))


def _spatial_after(arch: model_pb2.CnnArchitecture, where: str) -> None:
    """InvalidArgument naming the first block that leaves no spatial positions."""
    height, width = int(arch.input_shape[1]), int(arch.input_shape[2])
    for i, block in enumerate(arch.blocks):
        kernel, stride = kernel_of(block), stride_of(block)
        height = (height + 2 * (kernel // 2) - kernel) // stride + 1
        width = (width + 2 * (kernel // 2) - kernel) // stride + 1
        height, width = height // pool_of(block), width // pool_of(block)
        if height < 1 or width < 1:
            raise InvalidArgument(
                f"{where}.blocks[{i}] leaves no spatial positions for input {list(arch.input_shape)} "
                "(reduce its stride or pooling)"
            )


def validate_cnn(arch: model_pb2.CnnArchitecture, where: str = "architecture.cnn") -> None:
    if len(arch.input_shape) != 3 or any(d <= 0 for d in arch.input_shape):
        raise InvalidArgument(
            f"{where}.input_shape must be [channels, height, width], all positive, "
            f"got {list(arch.input_shape)}"
        )
    if arch.output_size <= 0:
        raise InvalidArgument(f"{where}.output_size must be positive, got {arch.output_size}")
    if not arch.blocks:
        raise InvalidArgument(f"{where}.blocks must list at least one convolution block")
    for i, block in enumerate(arch.blocks):
        at = f"{where}.blocks[{i}]"
        if block.out_channels <= 0:
            raise InvalidArgument(f"{at}.out_channels must be positive, got {block.out_channels}")
        if not 0 <= block.kernel_size <= 15 or (block.kernel_size and block.kernel_size % 2 == 0):
            raise InvalidArgument(f"{at}.kernel_size must be odd, at most 15 (0: 3), got {block.kernel_size}")
        if not 0 <= block.stride <= 8:
            raise InvalidArgument(f"{at}.stride must be in [1, 8] (0: 1), got {block.stride}")
        if block.pooling not in _BLOCK_POOLS:
            raise InvalidArgument(f"{at}.pooling {block.pooling} is unknown")
        if not 0 <= block.pool_size <= 8:
            raise InvalidArgument(f"{at}.pool_size must be in [1, 8] (0: 2), got {block.pool_size}")
    if arch.activation not in ACTIVATIONS:
        raise InvalidArgument(f"{where}.activation {arch.activation} is unknown")
    if not 0.0 <= arch.dropout < 1.0:
        raise InvalidArgument(f"{where}.dropout must be in [0, 1), got {arch.dropout}")
    if arch.global_pooling not in _GLOBAL_POOLS:
        raise InvalidArgument(f"{where}.global_pooling must be MAX or AVG, got {arch.global_pooling}")
    _spatial_after(arch, where)


def parameter_count(arch: model_pb2.CnnArchitecture) -> int:
    """Trainable parameters of the CNN ``arch`` describes, without building it."""
    channels, count = int(arch.input_shape[0]) if arch.input_shape else 0, 0
    for block in arch.blocks:
        kernel = kernel_of(block)
        count += channels * block.out_channels * kernel * kernel
        count += 2 * block.out_channels if block.batch_norm else block.out_channels
        channels = block.out_channels
    return count + (channels + 1) * arch.output_size


class CnnFamily:
    """The CNN as a model family (see common.models.families)."""

    name = "cnn"

    def default(self) -> model_pb2.CnnArchitecture:
        return model_pb2.CnnArchitecture(
            blocks=[
                model_pb2.ConvBlock(out_channels=32, batch_norm=True, pooling=model_pb2.POOLING_MAX),
                model_pb2.ConvBlock(out_channels=64, batch_norm=True),
            ]
        )

    def validate(self, arch: model_pb2.CnnArchitecture, where: str, sizes_from_dataset: bool = False) -> None:
        where = f"{where}.{self.name}"
        if not sizes_from_dataset:
            validate_cnn(arch, where)
            return
        if arch.output_size < 0:
            raise InvalidArgument(
                f"{where}.output_size must be >= 0 (0: from the dataset), got {arch.output_size}"
            )
        probe = model_pb2.CnnArchitecture()
        probe.CopyFrom(arch)
        probe.output_size = probe.output_size or 1
        if not probe.input_shape:
            # Unknown until the dataset is read: check everything but the spatial fit.
            probe.input_shape[:] = [1, 1 << 12, 1 << 12]
        validate_cnn(probe, where)

    def fit_to_dataset(
        self,
        arch: model_pb2.CnnArchitecture,
        example_shape: Sequence[int],
        outputs: int,
        where: str,
        dataset: str,
    ) -> None:
        where = f"{where}.{self.name}"
        if len(example_shape) != 3:
            raise InvalidArgument(
                f"{where}: the cnn family trains on images [channels, height, width], but {dataset} has "
                f"{math.prod(example_shape)} features per example (upload images, or use the mlp family)"
            )
        if not arch.input_shape:
            arch.input_shape[:] = list(example_shape)
        elif list(arch.input_shape) != list(example_shape):
            raise InvalidArgument(
                f"{where}.input_shape is {list(arch.input_shape)} "
                f"but {dataset} has images {list(example_shape)}"
            )
        fit_size(arch, "output_size", outputs, where, f"{dataset} needs {outputs}")
        validate_cnn(arch, where)

    def parameter_count(self, arch: model_pb2.CnnArchitecture) -> int:
        return parameter_count(arch)

    def input_width(self, arch: model_pb2.CnnArchitecture) -> int:
        return math.prod(arch.input_shape) if arch.input_shape else 0

    def build(self, arch: model_pb2.CnnArchitecture, norm: model_pb2.Normalization | None = None) -> CNN:
        return CNN(arch, norm)

    def hidden_units(self, arch: model_pb2.CnnArchitecture) -> int:
        return sum(block.out_channels for block in arch.blocks)

    @torch.no_grad()
    def prune_units(
        self, model: nn.Module, sparsity: float, norm: int
    ) -> tuple[CNN, model_pb2.CnnArchitecture, dict[str, Kept]]:
        """Each block's weakest output channels (filter norm) removed: the filter
        and its BatchNorm entries, and the matching input channels of the next
        convolution (or of the head)."""
        if not isinstance(model, CNN):
            raise InvalidArgument(f"not a CNN: {type(model).__name__}")
        old_convs = model.body.convs()
        kept = [units_to_keep(conv.weight, sparsity, norm) for conv, _ in old_convs]
        arch = model_pb2.CnnArchitecture()
        arch.CopyFrom(model.arch)
        for spec, keep in zip(arch.blocks, kept, strict=True):
            spec.out_channels = int(keep.numel())
        smaller = CNN(arch)
        smaller.norm = copy.deepcopy(model.norm)
        shapes: dict[str, Kept] = {}
        pairs = zip(old_convs, smaller.body.convs(), strict=True)
        for i, ((conv, bn), (new_conv, new_bn)) in enumerate(pairs):
            cut = Kept(rows=kept[i], cols=kept[i - 1] if i > 0 else None)
            new_conv.weight.copy_(cut.slice(conv.weight))
            shapes[f"body.blocks.{i}.conv.weight"] = cut
            if conv.bias is not None and new_conv.bias is not None:
                new_conv.bias.copy_(conv.bias[kept[i]])
            if bn is not None and new_bn is not None:
                targets = new_bn.state_dict()
                for name, tensor in bn.state_dict().items():  # num_batches_tracked is a scalar
                    targets[name].copy_(tensor if tensor.dim() == 0 else tensor[kept[i]])
        head = Kept(cols=kept[-1])
        smaller.body.head.weight.copy_(head.slice(model.body.head.weight))
        smaller.body.head.bias.copy_(model.body.head.bias)
        shapes["body.head.weight"] = head
        smaller.train(model.training)
        return smaller.to(model.body.head.weight.device), arch, shapes

    def trainable(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, CNN):
            raise InvalidArgument(f"not a CNN: {type(model).__name__}")
        return model.body

    def tensor_specs(self, arch: model_pb2.CnnArchitecture) -> Specs:
        """``input`` FP32 [-1, C, H, W] and ``output`` FP32 [-1, out]."""
        return io_specs(arch.input_shape, arch.output_size)


FAMILY = CnnFamily()
