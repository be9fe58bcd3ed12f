"""deploy/k8s and the Dockerfile agree with the Kubernetes schemas and with the code.

Every overlay is rendered (tests/deploy/kustomize.py; cross-checked against a
real kustomize where one is installed), each object is validated offline
against the Kubernetes OpenAPI schemas, and the settings, ports, commands and
image are checked against common/settings.py, the CLI and the Dockerfile. Each
app container's settings are built the way its pod would build them: the
ConfigMap, its own env, and the files its Secret volumes mount (written to a
temporary directory), so a file path that misses its mount fails here.
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

from common.auth import parse_token_lines
from common.settings import ENV_PREFIX, Settings
from services.cli.serve import SERVICES, WORKERS
from tests.deploy.kustomize import render, split_image

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "gpu-tls")
GPU_OVERLAYS = {"gpu", "gpu-tls"}
TLS_OVERLAYS = {"gpu-tls"}
# Oldest Kubernetes the manifests target (native gRPC probes are GA since 1.27).
K8S_VERSION = "1.30.0"
PRESTOP_PAUSE_S = 5
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = {
    "cpu": f"modelfleet:{VERSION}",
    "gpu": f"modelfleet:{VERSION}-cuda",
    "gpu-tls": f"modelfleet:{VERSION}-cuda",
}
# Secrets made out of band (cert-manager layout), with the keys a pod may find in them.
EXTERNAL_SECRETS = {"modelfleet-tls": ("tls.crt", "tls.key", "ca.crt")}
# Where plain tokens would go; neither may appear in a manifest.
PLAIN_TOKEN_VARS = re.compile(r"MODELFLEET_AUTH_TOKENS(?!_FILE)|MODELFLEET_TOKEN\b")

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
    """The settings every pod shares (the ConfigMap)."""
    return Settings.from_env(by_kind(objects, "ConfigMap")["modelfleet-config"]["data"])


def container_env(objects: list[Obj], name: str) -> dict[str, str]:
    env = dict(by_kind(objects, "ConfigMap")["modelfleet-config"]["data"])
    env.update({var["name"]: var["value"] for var in app_container(objects, name).get("env", [])})
    return env


def mounted_files(objects: list[Obj], name: str) -> dict[str, str]:
    """Path -> content of every file the container sees from a Secret volume."""
    pod = pod_specs(objects)[name]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secrets = by_kind(objects, "Secret")
    files = {}
    for mount in app_container(objects, name).get("volumeMounts", []):
        source = volumes[mount["name"]].get("secret")
        if source is None:
            continue
        secret_name = source["secretName"]
        if secret_name in secrets:
            data = secrets[secret_name]["stringData"]
        else:
            data = dict.fromkeys(EXTERNAL_SECRETS[secret_name], "")
        # A Secret mounted with subPath never sees an update: rotation needs the directory.
        assert "subPath" not in mount and mount.get("readOnly") is True, (name, mount)
        files.update({f"{mount['mountPath']}/{key}": text for key, text in data.items()})
    return files


def container_settings(objects: list[Obj], name: str, scratch: Path) -> Settings:
    """The settings ``name``'s container would build, its mounted files written under ``scratch``."""
    env = container_env(objects, name)
    files = mounted_files(objects, name)
    for key, value in env.items():
        if key.endswith("_FILE") and value:
            assert value in files, f"{name}: {key}={value} is not a file any volume mounts"
            local = scratch / name / value.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(files[value])
            env[key] = str(local)
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
    for pod in pod_specs(objects).values():
        for container in pod["containers"]:
            env_names |= {var["name"] for var in container.get("env", [])}
    modelfleet_names = {name for name in env_names if name.startswith(ENV_PREFIX)}
    assert modelfleet_names == env_names
    assert modelfleet_names <= names, modelfleet_names - names
    configured(objects)  # raises InvalidArgument naming the variable on a bad value


def test_every_app_container_starts_with_its_own_settings(
    objects: list[Obj], overlay: str, tmp_path: Path
) -> None:
    for name in [*SERVICES, *(f"{kind}-worker" for kind in WORKERS)]:
        assert app_container(objects, name)["envFrom"] == [{"configMapRef": {"name": "modelfleet-config"}}]
        # Raises InvalidArgument naming the variable on a bad value or a path that is not a file.
        settings = container_settings(objects, name, tmp_path)
        if name in SERVICES:
            assert settings.auth_tokens_file and not settings.auth_tokens, name
            assert settings.server_tls == (overlay in TLS_OVERLAYS), name
        else:
            # Workers call no service (only Redis and the artifact volume): no tokens, no certificates.
            assert mounted_files(objects, name) == {}, name
            assert not settings.auth_tokens_file and not settings.server_tls, name


def test_token_hash_file_is_mounted_where_the_env_points(objects: list[Obj]) -> None:
    secret = by_kind(objects, "Secret")["modelfleet-auth"]
    for name in SERVICES:
        path = container_env(objects, name)["MODELFLEET_AUTH_TOKENS_FILE"]
        mount_path, _, key = path.rpartition("/")
        (mount,) = [m for m in app_container(objects, name)["volumeMounts"] if m["mountPath"] == mount_path]
        (volume,) = [v for v in pod_specs(objects)[name]["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == secret["metadata"]["name"], name
        assert key in secret["stringData"], name


def test_no_plain_tokens_anywhere_and_the_shipped_file_grants_nothing(objects: list[Obj]) -> None:
    for obj in objects:
        assert not PLAIN_TOKEN_VARS.search(yaml.safe_dump(obj)), _key(obj)
    (secret,) = by_kind(objects, "Secret").values()
    (text,) = secret["stringData"].values()
    # Only commented placeholder lines: fail closed (UNAUTHENTICATED) until real hashes go in.
    assert parse_token_lines(text.splitlines()) == []
    assert "CHANGE-ME" in text
    assert "modelfleet auth hash-token" in (K8S / "base" / "secret.yaml").read_text()
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert "modelfleet auth hash-token" in operations and "MODELFLEET_AUTH_TOKENS_FILE" in operations


@pytest.mark.parametrize("service", SERVICES)
def test_service_ports_and_probes_match_settings(objects: list[Obj], overlay: str, service: str) -> None:
    port = getattr(Settings(), f"{service}_port")
    settings = configured(objects)
    assert getattr(settings, f"{service}_port") == port
    container = app_container(objects, service)
    assert container["command"] == ["modelfleet", "serve", service]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port
    if overlay in TLS_OVERLAYS:
        # Probes cannot speak TLS: they go to the plaintext health-only port.
        assert settings.health_port not in (0, port)
        assert ports["health"] == settings.health_port
        probe_port = settings.health_port
    else:
        assert settings.health_port == 0 and "health" not in ports
        probe_port = port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Native gRPC probe: grpc.health.v1, overall ("") status.
        assert container[probe]["grpc"] == {"port": probe_port}, probe
    svc = by_kind(objects, "Service")[service]
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert svc_ports["grpc"]["port"] == port and svc_ports["grpc"]["targetPort"] == "grpc"
    assert "health" not in svc_ports  # for the kubelet only, not a client endpoint
    template_labels = by_kind(objects, "Deployment")[service]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= template_labels.items()
    assert by_kind(objects, "ServiceAccount")[service]
    assert pod_specs(objects)[service]["serviceAccountName"] == service


def test_every_service_exposes_metrics_and_is_scraped(objects: list[Obj]) -> None:
    metrics = Settings().metrics_port
    deployments = by_kind(objects, "Deployment")
    for service in SERVICES:
        ports = {p["name"]: p["containerPort"] for p in app_container(objects, service)["ports"]}
        assert ports.get("metrics") == metrics, service
        annotations = deployments[service]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", service
        assert annotations["prometheus.io/port"] == str(metrics), service


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
        if overlay in GPU_OVERLAYS and name.endswith("-worker"):
            assert gpus == {"1"}, name
            assert env["MODELFLEET_DEVICE"] == "cuda"
            assert pod["nodeSelector"] and pod["tolerations"]
        else:
            assert gpus == {None}, name
            assert "nodeSelector" not in pod and "tolerations" not in pod
    assert settings.device == ("auto" if overlay in GPU_OVERLAYS else "cpu")


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
    # Clients reach the gRPC and metrics ports only, never the plaintext health port.
    (clients,) = policies["grpc-clients"]["spec"]["ingress"]
    assert {port["port"] for port in clients["ports"]} == {"grpc", "metrics"}


def test_mtls_component_adds_the_client_ca_after_tls(tmp_path: Path) -> None:
    overlay = tmp_path / "mtls"
    overlay.mkdir()
    kustomization = {
        "resources": [str(K8S / "base")],
        "components": [str(K8S / "components" / "tls"), str(K8S / "components" / "mtls")],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    objects = render(overlay)
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    for name in SERVICES:
        settings = container_settings(objects, name, tmp_path)
        assert settings.server_tls and settings.tls_client_ca_file.endswith("/ca.crt"), name
        assert container_env(objects, name)["MODELFLEET_TLS_CLIENT_CA_FILE"] == "/etc/modelfleet/tls/ca.crt"


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


_MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}


def _memory_bytes(quantity: str) -> int:
    for unit, factor in _MEMORY_UNITS.items():
        if quantity.endswith(unit):
            return int(float(quantity.removesuffix(unit)) * factor)
    return int(quantity)


def test_redis_maxmemory_below_container_limit_with_noeviction() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/k8s/base/redis.yaml").read_text()))
    sts = next(d for d in docs if d and d["kind"] == "StatefulSet")
    container = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "redis")
    args = [str(a) for a in container["args"]]
    assert "--maxmemory" in args, (
        "redis must run with --maxmemory or it is OOM-killed instead of refusing writes"
    )
    maxmemory = int(args[args.index("--maxmemory") + 1])
    limit = _memory_bytes(container["resources"]["limits"]["memory"])
    assert 0 < maxmemory < limit
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
