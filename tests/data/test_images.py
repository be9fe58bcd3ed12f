"""Datasets with an example shape: the digits source as 1x8x8 images, image
arrays uploaded as N x C x H x W or N x H x W x C, per-channel normalization,
and the shape carried to StreamBatches. Shards hold each image flattened."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.api.modelfleet.common.v1 import model_pb2
from common.api.modelfleet.data.v1 import data_pb2, data_pb2_grpc
from common.artifacts import ArtifactStore
from common.datasets import load_split
from common.errors import InvalidArgument
from services.data.service import DataService
from tests.data.test_grpc import messages

DIGITS = data_pb2.BUILTIN_SOURCE_DIGITS


def test_digits_as_images_and_per_channel_normalization(service: DataService, store: ArtifactStore) -> None:
    v = service.create_from_source(
        data_pb2.CreateDatasetFromSourceRequest(name="d", source=DIGITS, images=True)
    )
    assert list(v.example_shape) == [1, 8, 8] and v.num_features == 64 and v.num_rows == 1797
    assert "source(digits(images 1x8x8))" in v.operations
    tabular = service.create_from_source(data_pb2.CreateDatasetFromSourceRequest(name="t", source=DIGITS))
    assert list(tabular.example_shape) == [64]
    with pytest.raises(InvalidArgument, match="source iris has no image form"):
        service.create_from_source(
            data_pb2.CreateDatasetFromSourceRequest(
                name="i", source=data_pb2.BUILTIN_SOURCE_IRIS, images=True
            )
        )
    normalized = service.preprocess(
        data_pb2.PreprocessDatasetRequest(
            name="d",
            normalization=model_pb2.NORMALIZATION_KIND_ZSCORE,
            split=data_pb2.SplitSpec(val_fraction=0.2, seed=1),
        )
    )
    # One channel: one shift and one scale, over all of its pixels.
    assert len(set(normalized.normalization.shift)) == 1 and len(set(normalized.normalization.scale)) == 1
    assert list(normalized.example_shape) == [1, 8, 8]
    train, _ = load_split(store, service.get("d", normalized.version), "train")
    assert abs(float(train.mean())) < 1e-3 and abs(float(train.std()) - 1) < 1e-2
    with pytest.raises(InvalidArgument, match="drop_column does not apply to an image dataset"):
        service.preprocess(
            data_pb2.PreprocessDatasetRequest(name="d", transforms=[data_pb2.Transform(drop_column="c0")])
        )


@pytest.mark.parametrize("channels_last", [False, True])
async def test_image_arrays_upload_and_stream_with_their_shape(
    stub: data_pb2_grpc.DataServiceStub, tmp_path: Path, channels_last: bool
) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 3, 2, 2), dtype=np.uint8)  # N x C x H x W
    stored = images.transpose(0, 2, 3, 1) if channels_last else images
    path = tmp_path / "img.npz"
    np.savez(path, x=stored, y=np.arange(6) % 2)
    header = data_pb2.UploadDatasetHeader(
        name="img", format=data_pb2.DATA_FORMAT_NPZ, channels_last=channels_last
    )
    v = (await stub.UploadDataset(messages(header, path.read_bytes(), 500))).dataset
    assert list(v.example_shape) == [3, 2, 2] and v.num_features == 12 and list(v.class_names) == ["0", "1"]
    batches = [b async for b in stub.StreamBatches(data_pb2.StreamBatchesRequest(name="img", batch_size=6))]
    assert len(batches) == 1 and list(batches[0].example_shape) == [3, 2, 2]
    got = np.frombuffer(batches[0].features, "<f4").reshape(6, 3, 2, 2)
    np.testing.assert_array_equal(got, images.astype(np.float32))
