"""Train-split augmentation: random crop with padding and horizontal flip, on
image datasets only, seeded, and through a real training job."""

from __future__ import annotations

import pytest
import redis
import torch
import torch.nn.functional as F

from common.api.modelfleet.data.v1 import data_pb2
from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.training.v1 import training_pb2
from common.api.modelfleet.training.v1 import training_spec_pb2 as ts
from common.artifacts import ArtifactStore
from common.datasets import DatasetCatalog
from common.errors import InvalidArgument
from common.jobs import JobQueue
from common.settings import Settings
from services.training.augment import augment
from services.training.spec import bind_to_dataset, normalize_spec
from services.training.submit import TrainingSubmitter
from tests.training.conftest import add_digits_images
from tests.training.test_handler import run_one

pytestmark = pytest.mark.timeout(120)
SHAPE = (3, 4, 4)


def _images(n: int) -> torch.Tensor:
    return torch.arange(n * 48, dtype=torch.float32).reshape(n, 48)


def test_flip_mirrors_about_half_and_is_seeded() -> None:
    x = _images(64)
    spec = ts.Augmentation(horizontal_flip=True)
    out = augment(x, SHAPE, spec, torch.Generator().manual_seed(1))
    images, flipped = x.reshape(64, *SHAPE), out.reshape(64, *SHAPE)
    mirrored = [bool(torch.equal(f, i.flip(-1))) for f, i in zip(flipped, images, strict=True)]
    kept = [bool(torch.equal(f, i)) for f, i in zip(flipped, images, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True)) and 10 < sum(mirrored) < 54
    assert torch.equal(out, augment(x, SHAPE, spec, torch.Generator().manual_seed(1)))


def test_crop_is_a_window_of_the_padded_image() -> None:
    x = _images(32)
    out = augment(x, SHAPE, ts.Augmentation(random_crop_padding=1), torch.Generator().manual_seed(2)).reshape(
        32, *SHAPE
    )
    padded = F.pad(x.reshape(32, *SHAPE), (1, 1, 1, 1))
    offsets = set()
    for image, pad in zip(out, padded, strict=True):
        found = [
            (i, j) for i in range(3) for j in range(3) if torch.equal(pad[:, i : i + 4, j : j + 4], image)
        ]
        assert found, "each crop is a 4x4 window of the padded image"
        offsets.add(found[0])
    assert len(offsets) > 3  # offsets vary per image


def test_augmentation_needs_an_image_dataset() -> None:
    spec = normalize_spec(ts.TrainingSpec(dataset_name="d", model_name="m"))
    spec.augmentation.horizontal_flip = True
    tabular = data_pb2.DatasetVersion(
        name="d",
        version="1",
        num_features=64,
        example_shape=[64],
        task=data_pb2.DATASET_TASK_CLASSIFICATION,
        num_classes=10,
    )
    with pytest.raises(InvalidArgument, match=r"spec\.augmentation applies to image datasets"):
        bind_to_dataset(spec, tabular, {"train"})
    images = data_pb2.DatasetVersion()
    images.CopyFrom(tabular)
    images.example_shape[:] = [1, 8, 8]
    bind_to_dataset(spec, images, {"train"})
    spec.augmentation.random_crop_padding = 9
    with pytest.raises(InvalidArgument, match="random_crop_padding must be at most 8"):
        bind_to_dataset(spec, images, {"train"})


def test_a_training_job_with_augmentation_succeeds(
    catalog: DatasetCatalog, store: ArtifactStore, fast_settings: Settings, redis_client: redis.Redis
) -> None:
    add_digits_images(catalog, store)
    spec = ts.TrainingSpec(dataset_name="digits-img", model_name="m", epochs=2, batch_size=64)
    spec.augmentation.random_crop_padding = 1
    spec.augmentation.horizontal_flip = True
    queue = JobQueue(redis_client, fast_settings)
    job = TrainingSubmitter(queue, catalog).submit(training_pb2.SubmitTrainingJobRequest(spec=spec))
    done = run_one(queue, redis_client, fast_settings, store, job.id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.last_error
    assert done.metrics["epochs_run"] == 2 and done.metrics["test_accuracy"] > 0.5
