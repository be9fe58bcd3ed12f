"""deploy/k8s and the Dockerfile agree with the Kubernetes schemas and with the code.

Every overlay is rendered (tests/deploy/kustomize.py; cross-checked against a
real kustomize where one is installed), each object is validated offline
against the Kubernetes OpenAPI schemas, and the settings, ports, commands and
image are checked against common/settings.py, the CLI and the Dockerfile.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common.settings import ENV_PREFIX, Settings
from services.cli.serve import SERVICES, WORKERS
from tests.deploy.kustomize import render, split_image

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# Oldest Kubernetes the manifests target (native gRPC probes are GA since 1.27).
K8S_VERSION = "1.30.0"
PRESTOP_PAUSE_S = 5
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = {"cpu": f"modelfleet:{VERSION}", "gpu": f"modelfleet:{VERSION}-cuda"}

Obj = dict[str, Any]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture
def objects(rendered: dict[str, list[Obj]], overlay: str) -> list[Obj]:
    return rendered[overlay]


def by_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def pod_specs(objects: list[Obj]) -> dict[str, Obj]:
    return {
        obj["metadata"]["name"]: obj["spec"]["template"]["spec"]
        for obj in objects
        if obj["kind"] in ("Deployment", "StatefulSet")
    }


def app_container(objects: list[Obj], name: str) -> Obj:
    (container,) = pod_specs(objects)[name]["containers"]
    return container


def configured(objects: list[Obj]) -> Settings:
    env = {**by_kind(objects, "ConfigMap")["modelfleet-config"]["data"]}
    env.update(by_kind(objects, "Secret")["modelfleet-auth"]["stringData"])
    return Settings.from_env(env)


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _key(obj: Obj) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


@pytest.mark.skipif(_kustomize_command() is None, reason="no kustomize or kubectl on PATH")
def test_renderer_matches_kustomize(objects: list[Obj], overlay: str) -> None:
    command = [*(_kustomize_command() or []), str(K8S / "overlays" / overlay)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout
    theirs = {_key(obj): obj for obj in yaml.safe_load_all(out) if obj}
    ours = {_key(obj): obj for obj in objects}
    assert sorted(ours) == sorted(theirs)
    for key, obj in ours.items():
        assert obj == theirs[key], key


def test_every_object_validates_against_the_kubernetes_schema(objects: list[Obj]) -> None:
    for obj in objects:
        # strict: unknown fields (a typo such as readinesProbe) fail too.
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_everything_lives_in_one_namespace_and_is_labelled(objects: list[Obj]) -> None:
    (namespace,) = by_kind(objects, "Namespace")
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "modelfleet", _key(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, _key(obj)


def test_env_names_are_settings_fields_and_values_parse(objects: list[Obj]) -> None:
    names = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    env_names = set(by_kind(objects, "ConfigMap")["modelfleet-config"]["data"])
    env_names |= set(by_kind(objects, "Secret")["modelfleet-auth"]["stringData"])
    for pod in pod_specs(objects).values():
        for container in pod["containers"]:
            env_names |= {var["name"] for var in container.get("env", [])}
    modelfleet_names = {name for name in env_names if name.startswith(ENV_PREFIX)}
    assert modelfleet_names == env_names
    assert modelfleet_names <= names, modelfleet_names - names
    configured(objects)  # raises InvalidArgument naming the variable on a bad value


def test_every_app_container_reads_the_config_and_the_auth_secret(objects: list[Obj]) -> None:
    for name in [*SERVICES, *(f"{kind}-worker" for kind in WORKERS)]:
        sources = app_container(objects, name)["envFrom"]
        assert {"configMapRef": {"name": "modelfleet-config"}} in sources
        assert {"secretRef": {"name": "modelfleet-auth"}} in sources


def test_auth_secret_is_a_marked_placeholder(objects: list[Obj]) -> None:
    tokens = by_kind(objects, "Secret")["modelfleet-auth"]["stringData"]["MODELFLEET_AUTH_TOKENS"]
    assert "CHANGE-ME" in tokens
    assert "MODELFLEET_AUTH_TOKENS" in (ROOT / "docs" / "operations.md").read_text()


@pytest.mark.parametrize("service", SERVICES)
def test_service_ports_and_probes_match_settings(objects: list[Obj], service: str) -> None:
    port = getattr(Settings(), f"{service}_port")
    assert getattr(configured(objects), f"{service}_port") == port
    container = app_container(objects, service)
    assert container["command"] == ["modelfleet", "serve", service]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Native gRPC probe: grpc.health.v1 on the serving port, overall ("") status.
        assert container[probe]["grpc"] == {"port": port}, probe
    svc = by_kind(objects, "Service")[service]
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert svc_ports["grpc"]["port"] == port and svc_ports["grpc"]["targetPort"] == "grpc"
    template_labels = by_kind(objects, "Deployment")[service]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= template_labels.items()
    assert by_kind(objects, "ServiceAccount")[service]
    assert pod_specs(objects)[service]["serviceAccountName"] == service


def test_metrics_port_only_on_inference_and_scraped(objects: list[Obj]) -> None:
    metrics = Settings().metrics_port
    for service in SERVICES:
        ports = {p["name"]: p["containerPort"] for p in app_container(objects, service)["ports"]}
        assert ports.get("metrics") == (metrics if service == "inference" else None), service
    annotations = by_kind(objects, "Deployment")["inference"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics)


@pytest.mark.parametrize("kind", WORKERS)
def test_workers_run_the_worker_command_without_ports(objects: list[Obj], kind: str) -> None:
    container = app_container(objects, f"{kind}-worker")
    assert container["command"] == ["modelfleet", "worker", kind]
    assert "ports" not in container


def test_gpu_only_in_the_gpu_overlay_and_only_for_workers(objects: list[Obj], overlay: str) -> None:
    settings = configured(objects)
    for name, pod in pod_specs(objects).items():
        (container,) = pod["containers"]
        resources = container["resources"]
        gpus = {resources["requests"].get("nvidia.com/gpu"), resources["limits"].get("nvidia.com/gpu")}
        env = {var["name"]: var["value"] for var in container.get("env", [])}
        if overlay == "gpu" and name.endswith("-worker"):
            assert gpus == {"1"}, name
            assert env["MODELFLEET_DEVICE"] == "cuda"
            assert pod["nodeSelector"] and pod["tolerations"]
        else:
            assert gpus == {None}, name
            assert "nodeSelector" not in pod and "tolerations" not in pod
    assert settings.device == ("cpu" if overlay == "cpu" else "auto")


def test_images_are_the_ones_the_dockerfile_builds(objects: list[Obj], overlay: str) -> None:
    for name, pod in pod_specs(objects).items():
        if name == "redis":
            continue
        for container in pod["containers"]:
            assert container["image"] == IMAGE[overlay], name
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"docker build -t {IMAGE[overlay]} " in dockerfile
    assert f"docker build -t {IMAGE[overlay]} " in (ROOT / "docs" / "operations.md").read_text()
    assert split_image(IMAGE[overlay])[0] == "modelfleet"


def test_grace_periods_cover_the_drain(objects: list[Obj]) -> None:
    settings = configured(objects)
    for name, pod in pod_specs(objects).items():
        grace = pod["terminationGracePeriodSeconds"]
        if name in SERVICES:
            (container,) = pod["containers"]
            assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_PAUSE_S)]
            assert grace > PRESTOP_PAUSE_S + settings.shutdown_grace_s, name
        elif name.endswith("-worker"):
            # A warm shutdown may run a training step and a checkpoint write.
            assert grace >= 60 and grace > settings.job_visibility_timeout_s, name


def test_pods_are_locked_down(objects: list[Obj]) -> None:
    for name, pod in pod_specs(objects).items():
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert "memory" in container["resources"]["limits"], name


def test_app_pods_get_a_writable_tmp_and_the_shared_artifact_volume(objects: list[Obj]) -> None:
    root = str(configured(objects).artifact_root)
    claim = by_kind(objects, "PersistentVolumeClaim")["modelfleet-artifacts"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, pod in pod_specs(objects).items():
        if name == "redis":
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], name
        assert volumes[mounts[root]]["persistentVolumeClaim"]["claimName"] == "modelfleet-artifacts", name


def test_redis_persists_with_aof_on_a_volume(objects: list[Obj]) -> None:
    redis = by_kind(objects, "StatefulSet")["redis"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    data_dir = args[args.index("--dir") + 1]
    (template,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": template["metadata"]["name"], "mountPath": data_dir} in container["volumeMounts"]
    service = by_kind(objects, "Service")["redis"]
    assert configured(objects).redis_url.startswith(f"redis://{service['metadata']['name']}:6379/")


def test_inference_has_a_disruption_budget_and_an_autoscaler(objects: list[Obj]) -> None:
    deployment = by_kind(objects, "Deployment")["inference"]
    pdb = by_kind(objects, "PodDisruptionBudget")["inference"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["inference"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "inference",
    }
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]


def test_network_policy_denies_by_default_and_admits_only_fleet_to_redis(objects: list[Obj]) -> None:
    policies = by_kind(objects, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    (rule,) = policies["redis-from-fleet"]["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "modelfleet"}}}]
    # Workers take no traffic: no ingress policy selects them.
    worker_labels = by_kind(objects, "Deployment")["training-worker"]["spec"]["template"]["metadata"][
        "labels"
    ]
    for name, policy in policies.items():
        if "Ingress" in policy["spec"]["policyTypes"] and policy["spec"].get("ingress"):
            assert not policy["spec"]["podSelector"]["matchLabels"].items() <= worker_labels.items(), name


def test_dockerfile_is_multi_stage_non_root_with_pinned_cpu_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert "torch==${TORCH_VERSION}" in text
    assert f'org.opencontainers.image.version="{VERSION}"' in text
    users = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    assert users and all(int(uid) != 0 for uid, _ in users)
    uid = int(users[-1][0])
    for pod in pod_specs(render(K8S / "overlays" / "cpu")).values():
        if pod["containers"][0]["image"].startswith("modelfleet:"):
            assert pod["securityContext"]["runAsUser"] == uid
    assert re.search(r'^ENTRYPOINT \["modelfleet"\]$', text, re.M)


def test_dockerignore_keeps_what_the_package_build_needs() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for needed in ("pyproject.toml", project["readme"], "common", "services"):
        assert needed not in ignored, needed
    assert ".git" in ignored
