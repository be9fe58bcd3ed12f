from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import InvalidArgument
from common.settings import Settings


def test_defaults_and_env_parsing() -> None:
    s = Settings.from_env(
        {
            "MODELFLEET_INFERENCE_PORT": "9001",
            "MODELFLEET_AUTH_TOKENS": " a , b ,",
            "MODELFLEET_ARTIFACT_ROOT": "/data/artifacts",
            "MODELFLEET_SHUTDOWN_GRACE_S": "2.5",
            "MODELFLEET_INFERENCE_MODELS": "",
        }
    )
    assert s.inference_port == 9001
    assert s.auth_tokens == ("a", "b")
    assert s.artifact_root == Path("/data/artifacts")
    assert s.shutdown_grace_s == 2.5
    assert s.inference_models == ()
    assert Settings.from_env({}).max_message_bytes > 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("MODELFLEET_INFERENCE_PORT", "eighty", "MODELFLEET_INFERENCE_PORT"),
        ("MODELFLEET_DEVICE", "tpu", "MODELFLEET_DEVICE"),
        ("MODELFLEET_MAX_BATCH_SIZE", "0", "MODELFLEET_MAX_BATCH_SIZE"),
        ("MODELFLEET_DATA_PORT", "70000", "MODELFLEET_DATA_PORT"),
        ("MODELFLEET_REDIS_PREFIX", "a:b", "MODELFLEET_REDIS_PREFIX"),
    ],
)
def test_bad_values_name_the_variable(key: str, value: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        Settings.from_env({key: value})


def test_env_round_trip() -> None:
    s = Settings.from_env({}, auth_tokens=("x",), inference_models=("a", "b"), metrics_port=0)
    assert Settings.from_env(s.env()) == s
