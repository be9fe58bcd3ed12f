"""A small renderer for the subset of kustomize that deploy/k8s uses.

CI machines need not have ``kustomize`` or ``kubectl``, so the manifest tests
render with this instead; where either binary is present, a test checks that
both produce the same objects. Supported: ``resources`` (files and
directories), ``components``, ``namespace``, ``images`` (newName/newTag) and
``patches`` holding inline JSON 6902 operations (add/replace/remove) with a
target by kind, name and equality label selector. Any other key is refused
rather than silently ignored, so the renderer cannot drift from what it claims.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "namespace", "images", "patches"}
_PATCH_KEYS = {"target", "patch"}
_TARGET_KEYS = {"kind", "name", "labelSelector"}
_IMAGE_KEYS = {"name", "newName", "newTag"}
# Kinds the namespace transformer leaves alone (the ones this repo could use).
_CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}


class UnsupportedKustomization(ValueError):
    pass


def render(directory: Path) -> list[Obj]:
    """Render the kustomization in ``directory`` to a list of objects."""
    return _build(directory, expected_kind="Kustomization", objects=[])


def _build(directory: Path, expected_kind: str, objects: list[Obj]) -> list[Obj]:
    spec = _load_kustomization(directory, expected_kind)
    out = list(objects)
    for entry in spec.get("resources", []):
        path = directory / entry
        out += render(path) if path.is_dir() else _load_documents(path)
    for entry in spec.get("components", []):
        # A component sees, and transforms, everything accumulated so far.
        out = _build(directory / entry, expected_kind="Component", objects=out)
    for patch in spec.get("patches", []):
        _apply_patch(out, patch)
    for image in spec.get("images", []):
        _set_image(out, image)
    if "namespace" in spec:
        for obj in out:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    return out


def _load_kustomization(directory: Path, expected_kind: str) -> Obj:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if spec.get("kind", "Kustomization") != expected_kind:
        raise UnsupportedKustomization(f"{directory}: expected kind {expected_kind}, got {spec.get('kind')}")
    _refuse_unknown(directory, spec, _KUSTOMIZATION_KEYS)
    return spec


def _refuse_unknown(where: Path, mapping: Obj, allowed: set[str]) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise UnsupportedKustomization(f"{where}: unsupported keys {sorted(unknown)}")


def _load_documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _apply_patch(objects: list[Obj], patch: Obj) -> None:
    _refuse_unknown(Path("patches"), patch, _PATCH_KEYS)
    target = patch["target"]
    _refuse_unknown(Path("patches.target"), target, _TARGET_KEYS)
    operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise UnsupportedKustomization("only JSON 6902 patches (a list of operations) are supported")
    matched = [obj for obj in objects if _matches(obj, target)]
    if not matched:
        raise UnsupportedKustomization(f"patch target {target} matches no object")
    for obj in matched:
        for op in operations:
            json_patch(obj, op)


def _matches(obj: Obj, target: Obj) -> bool:
    if "kind" in target and obj["kind"] != target["kind"]:
        return False
    if "name" in target and obj["metadata"]["name"] != target["name"]:
        return False
    labels = obj["metadata"].get("labels", {})
    for term in target.get("labelSelector", "").split(","):
        if not term:
            continue
        key, sep, value = term.partition("=")
        if not sep or key.endswith("!"):
            raise UnsupportedKustomization(f"only key=value label selectors are supported, not {term!r}")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


def json_patch(doc: Obj, op: Obj) -> None:
    """Apply one RFC 6902 operation (add, replace or remove) in place."""
    *parents, last = _pointer(op["path"])
    parent: Any = doc
    for token in parents:
        parent = parent[int(token)] if isinstance(parent, list) else parent[token]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" and kind == "add" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[index]
        else:
            raise UnsupportedKustomization(f"unsupported JSON patch op {kind!r}")
        return
    if kind == "add":
        parent[last] = copy.deepcopy(op["value"])
    elif kind in ("replace", "remove"):
        if last not in parent:
            raise KeyError(f"{op['path']}: no such member to {kind}")
        if kind == "replace":
            parent[last] = copy.deepcopy(op["value"])
        else:
            del parent[last]
    else:
        raise UnsupportedKustomization(f"unsupported JSON patch op {kind!r}")


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise UnsupportedKustomization(f"JSON pointer must start with '/': {path!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _set_image(objects: list[Obj], image: Obj) -> None:
    _refuse_unknown(Path("images"), image, _IMAGE_KEYS)
    for obj in objects:
        for container in _containers(obj):
            name, tag = split_image(container["image"])
            if name != image["name"]:
                continue
            tag = image.get("newTag", tag)
            container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")


def split_image(reference: str) -> tuple[str, str]:
    """``registry:5000/name:tag`` -> (``registry:5000/name``, ``tag``); the tag may be empty."""
    name, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        return reference, ""
    return name, tag


def _containers(obj: Obj) -> list[Obj]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec)
    return [*pod.get("initContainers", []), *pod.get("containers", [])]
