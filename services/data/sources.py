"""Built-in datasets: seeded synthetic regression and scikit-learn's bundled
sets (shipped inside the package, so nothing is downloaded)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn import datasets as skdatasets

from common.api.modelfleet.data.v1 import data_pb2
from common.errors import InvalidArgument, ResourceExhausted
from services.data.table import CLASSIFICATION, REGRESSION, Table

DEFAULT_SAMPLES = 10_000
DEFAULT_FEATURES = 1000
DEFAULT_NOISE = 0.1

_SKLEARN: dict[int, tuple[str, Callable[..., Any]]] = {
    data_pb2.BUILTIN_SOURCE_DIGITS: ("digits", skdatasets.load_digits),
    data_pb2.BUILTIN_SOURCE_IRIS: ("iris", skdatasets.load_iris),
    data_pb2.BUILTIN_SOURCE_BREAST_CANCER: ("breast-cancer", skdatasets.load_breast_cancer),
}


def _features(names: list[str]) -> list[data_pb2.Column]:
    return [data_pb2.Column(name=n, dtype="float32", role=data_pb2.COLUMN_ROLE_FEATURE) for n in names]


def synthetic_regression(spec: data_pb2.SyntheticRegression, max_bytes: int) -> Table:
    """y = x.w + b + noise with x ~ N(0, 1), w ~ N(0, 1/n_features) (so y has
    unit-order variance whatever the width), b ~ N(0, 1); all from ``seed``."""
    n = spec.n_samples or DEFAULT_SAMPLES
    d = spec.n_features or DEFAULT_FEATURES
    noise = spec.noise or DEFAULT_NOISE
    if n < 0 or d < 0 or not (noise >= 0 and math.isfinite(noise)):
        raise InvalidArgument("synthetic: n_samples, n_features and noise must be >= 0 (noise finite)")
    if spec.seed < 0:
        raise InvalidArgument(f"synthetic.seed must be >= 0, not {spec.seed}")
    if n * d * 4 > max_bytes:
        raise ResourceExhausted(
            f"synthetic: {n} x {d} float32 features exceed the limit of {max_bytes} bytes"
        )
    rng = np.random.default_rng(spec.seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal(d).astype(np.float32) / np.float32(np.sqrt(d))
    b = np.float32(rng.standard_normal())
    y = x @ w + b + rng.normal(0.0, noise, n).astype(np.float32)
    return Table(
        columns=_features([f"x{i}" for i in range(d)]),
        features=x,
        label=data_pb2.Column(name="y", dtype="float32", role=data_pb2.COLUMN_ROLE_LABEL),
        labels=y.astype(np.float32),
        task=REGRESSION,
        class_names=[],
    )


def source_name(source: data_pb2.BuiltinSource.ValueType) -> str:
    if source == data_pb2.BUILTIN_SOURCE_SYNTHETIC_REGRESSION:
        return "synthetic"
    if source in _SKLEARN:
        return _SKLEARN[source][0]
    raise InvalidArgument("source is required: SYNTHETIC_REGRESSION, DIGITS, IRIS or BREAST_CANCER")


# Sources that are images at heart, and the (C, H, W) of one image.
_IMAGE_SHAPES = {data_pb2.BUILTIN_SOURCE_DIGITS: (1, 8, 8)}


def load_source(request: data_pb2.CreateDatasetFromSourceRequest, max_bytes: int) -> Table:
    name = source_name(request.source)
    if request.images and request.source not in _IMAGE_SHAPES:
        raise InvalidArgument(f"images: source {name} has no image form (only digits has)")
    if request.source == data_pb2.BUILTIN_SOURCE_SYNTHETIC_REGRESSION:
        return synthetic_regression(request.synthetic, max_bytes)
    bunch = _SKLEARN[request.source][1]()
    classes = [str(c) for c in bunch.target_names]
    return Table(
        columns=_features([str(n) for n in bunch.feature_names]),
        features=np.ascontiguousarray(bunch.data, dtype=np.float32),
        label=data_pb2.Column(
            name="target", dtype="int64", role=data_pb2.COLUMN_ROLE_LABEL, categories=classes
        ),
        labels=bunch.target.astype(np.int64),
        task=CLASSIFICATION,
        class_names=classes,
        example_shape=_IMAGE_SHAPES[request.source] if request.images else (),
    )
