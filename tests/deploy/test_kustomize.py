"""The test renderer (tests/deploy/kustomize.py) and the schema check catch what they claim to."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy.kustomize import UnsupportedKustomization, json_patch, render, split_image


def write(directory: Path, files: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_text(yaml.safe_dump_all(content if isinstance(content, list) else [content]))
    return directory


def config_map(name: str, labels: dict[str, str] | None = None) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels or {}},
        "data": {},
    }


def test_json_patch_add_replace_remove_with_escaped_keys() -> None:
    doc = {"a": {"list": [1, 3]}, "limits": {}}
    json_patch(doc, {"op": "add", "path": "/limits/nvidia.com~1gpu", "value": "1"})
    json_patch(doc, {"op": "add", "path": "/a/list/1", "value": 2})
    json_patch(doc, {"op": "add", "path": "/a/list/-", "value": 4})
    json_patch(doc, {"op": "replace", "path": "/a/list/0", "value": 0})
    json_patch(doc, {"op": "remove", "path": "/a/list/3"})
    assert doc == {"a": {"list": [0, 2, 3]}, "limits": {"nvidia.com/gpu": "1"}}
    with pytest.raises(KeyError):
        json_patch(doc, {"op": "replace", "path": "/missing", "value": 1})
    with pytest.raises(UnsupportedKustomization):
        json_patch(doc, {"op": "move", "path": "/a", "from": "/limits"})


def test_components_patch_by_label_selector_and_namespace_is_set(tmp_path: Path) -> None:
    write(
        tmp_path / "base",
        {
            "kustomization.yaml": {"resources": ["objects.yaml"], "namespace": "ns"},
            "objects.yaml": [config_map("a", {"tier": "x"}), config_map("b", {"tier": "y"})],
        },
    )
    patch = yaml.safe_dump([{"op": "add", "path": "/data/K", "value": "v"}])
    write(
        tmp_path / "component",
        {
            "kustomization.yaml": {
                "kind": "Component",
                "patches": [{"target": {"kind": "ConfigMap", "labelSelector": "tier=x"}, "patch": patch}],
            },
        },
    )
    write(
        tmp_path / "overlay",
        {"kustomization.yaml": {"resources": ["../base"], "components": ["../component"]}},
    )
    objects = {obj["metadata"]["name"]: obj for obj in render(tmp_path / "overlay")}
    assert objects["a"]["data"] == {"K": "v"} and objects["b"]["data"] == {}
    assert {obj["metadata"]["namespace"] for obj in objects.values()} == {"ns"}


def test_unknown_kustomization_keys_and_empty_targets_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "a", {"kustomization.yaml": {"resources": [], "commonLabels": {"x": "y"}}})
    with pytest.raises(UnsupportedKustomization, match="commonLabels"):
        render(tmp_path / "a")
    patch = yaml.safe_dump([{"op": "add", "path": "/data/K", "value": "v"}])
    write(
        tmp_path / "b",
        {
            "kustomization.yaml": {
                "resources": ["o.yaml"],
                "patches": [{"target": {"name": "zz"}, "patch": patch}],
            },
            "o.yaml": config_map("a"),
        },
    )
    with pytest.raises(UnsupportedKustomization, match="matches no object"):
        render(tmp_path / "b")


def test_split_image_handles_registry_ports_and_missing_tags() -> None:
    assert split_image("modelfleet:0.1.0") == ("modelfleet", "0.1.0")
    assert split_image("registry:5000/modelfleet") == ("registry:5000/modelfleet", "")
    assert split_image("registry:5000/modelfleet:1") == ("registry:5000/modelfleet", "1")


def test_strict_schema_validation_rejects_a_misspelt_field() -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "i", "readinesProbe": {}}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.30.0", strict=True)
