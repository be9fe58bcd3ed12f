"""The one settings object, read from ``MODELFLEET_*`` environment variables.

Every service and worker builds a :class:`Settings` at start-up with
:meth:`Settings.from_env`; a bad value stops the process with a message that
names the variable. Field ``foo_bar`` is read from ``MODELFLEET_FOO_BAR``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from common.errors import InvalidArgument

ENV_PREFIX = "MODELFLEET_"
DEVICES = ("auto", "cpu", "cuda")
LOG_FORMATS = ("json", "text")


@dataclass(frozen=True)
class Settings:
    # --- shared infrastructure
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Prefix of every Redis key and channel; lets deployments (and tests) share a Redis.
    redis_prefix: str = "mf"
    # Servers: a Redis command answers or fails within about this long, so RPCs
    # needing Redis get UNAVAILABLE in bounded time while it is down.
    redis_timeout_s: float = 2.0
    artifact_root: Path = Path(".modelfleet/artifacts")
    # Model device for inference, training and compression: auto, cpu or cuda.
    device: str = "auto"
    # Torch intra-op threads per busy process (one beat two under load on CPU).
    torch_threads: int = 1
    log_level: str = "INFO"
    log_format: str = "json"

    # --- gRPC servers
    host: str = "0.0.0.0"
    inference_port: int = 8001
    metrics_port: int = 8002
    data_port: int = 50051
    training_port: int = 50052
    compression_port: int = 50053
    # Largest gRPC message in either direction; gRPC's own default is 4 MiB.
    max_message_bytes: int = 256 * 1024 * 1024
    # Largest message the data, training and compression servers accept: specs and
    # upload chunks, never tensors, so a client cannot make them buffer 256 MiB.
    control_max_message_bytes: int = 16 * 1024 * 1024
    # Client tokens as hashes with roles: lines "sha256:<hex> <role> <client-name>"
    # (docs/security.md). Re-read when the file changes.
    auth_tokens_file: str = ""
    # Development only: comma-separated plain tokens, each an admin. With neither
    # this nor auth_tokens_file set, auth is off.
    auth_tokens: tuple[str, ...] = ()
    # Server TLS: certificate chain and key (PEM). With client_ca set, clients
    # must present a certificate signed by it (mutual TLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Client side (CLI, demo, fleet health checks): trust this CA and, for
    # mutual TLS, present this certificate and key. tls_server_name overrides
    # the name checked against the server certificate.
    tls_ca_file: str = ""
    tls_client_cert_file: str = ""
    tls_client_key_file: str = ""
    tls_server_name: str = ""
    # Plaintext port serving only grpc.health.v1 (0 = off): Kubernetes' native
    # gRPC probes cannot speak TLS, so with TLS on they probe this port instead.
    health_port: int = 0
    # Seconds in-flight calls get to finish after SIGTERM.
    shutdown_grace_s: float = 10.0

    # --- inference
    # Models served at start-up: "*" follows every model in the registry,
    # a comma list names them, empty serves only what RepositoryModelLoad asks for.
    inference_models: tuple[str, ...] = ("*",)
    max_batch_size: int = 32
    # Extra wait for a batch to fill when the model is idle; 0 dispatches at once.
    max_queue_delay_us: int = 0
    # Requests waiting per model before RESOURCE_EXHAUSTED.
    max_queue_size: int = 1024
    # Requests with NaN/Inf inputs: "allow" or "reject".
    nan_policy: str = "allow"

    # --- data
    max_upload_bytes: int = 1024 * 1024 * 1024
    # Largest model (parameters) a training job may build: one that can never fit is
    # refused at submit instead of failing attempt after attempt. 2**28 = 1 GiB of fp32.
    max_model_parameters: int = 2**28

    # --- jobs
    # A job not heartbeated for this long is reclaimed by another worker.
    job_visibility_timeout_s: float = 30.0
    job_heartbeat_s: float = 5.0
    job_max_attempts: int = 3
    # Base of the exponential retry backoff.
    job_retry_backoff_s: float = 1.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from the environment; ``overrides`` win over it."""
        env = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in env:
                values[f.name] = _parse(key, env[key], hints[f.name])
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        if self.device not in DEVICES:
            raise InvalidArgument(
                f"MODELFLEET_DEVICE must be one of {', '.join(DEVICES)}, not {self.device!r}"
            )
        if self.log_format not in LOG_FORMATS:
            raise InvalidArgument(f"MODELFLEET_LOG_FORMAT must be json or text, not {self.log_format!r}")
        if self.nan_policy not in ("allow", "reject"):
            raise InvalidArgument(f"MODELFLEET_NAN_POLICY must be allow or reject, not {self.nan_policy!r}")
        ports = (
            "inference_port",
            "metrics_port",
            "data_port",
            "training_port",
            "compression_port",
            "health_port",
        )
        for name in ports:
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise InvalidArgument(f"MODELFLEET_{name.upper()} must be a port number, not {port}")
        positive = (
            "torch_threads",
            "max_message_bytes",
            "control_max_message_bytes",
            "max_batch_size",
            "max_queue_size",
            "max_upload_bytes",
            "job_visibility_timeout_s",
            "job_heartbeat_s",
            "job_max_attempts",
            "redis_timeout_s",
            "max_model_parameters",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise InvalidArgument(
                    f"MODELFLEET_{name.upper()} must be positive, not {getattr(self, name)}"
                )
        if self.job_heartbeat_s >= self.job_visibility_timeout_s:
            raise InvalidArgument(
                "MODELFLEET_JOB_HEARTBEAT_S must be below MODELFLEET_JOB_VISIBILITY_TIMEOUT_S"
            )
        if self.max_queue_delay_us < 0:
            raise InvalidArgument("MODELFLEET_MAX_QUEUE_DELAY_US must be >= 0")
        self._validate_security()
        if not self.redis_prefix or ":" in self.redis_prefix:
            raise InvalidArgument("MODELFLEET_REDIS_PREFIX must be non-empty and contain no ':'")

    def _validate_security(self) -> None:
        pairs = (("tls_cert_file", "tls_key_file"), ("tls_client_cert_file", "tls_client_key_file"))
        for a, b in pairs:
            if bool(getattr(self, a)) != bool(getattr(self, b)):
                raise InvalidArgument(
                    f"MODELFLEET_{a.upper()} and MODELFLEET_{b.upper()} must be set together"
                )
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise InvalidArgument(
                "MODELFLEET_TLS_CLIENT_CA_FILE needs MODELFLEET_TLS_CERT_FILE and _KEY_FILE"
            )
        files = (
            "auth_tokens_file",
            *(f.name for f in fields(self) if f.name.startswith("tls_") and f.name.endswith("_file")),
        )
        for name in files:
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise InvalidArgument(f"MODELFLEET_{name.upper()}: {path} is not a readable file")

    @property
    def server_tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def client_tls(self) -> bool:
        return bool(self.tls_ca_file or self.tls_client_cert_file)

    def env(self) -> dict[str, str]:
        """These settings as environment variables (for child processes)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[ENV_PREFIX + f.name.upper()] = ",".join(value) if isinstance(value, tuple) else str(value)
        return out


def _parse(key: str, raw: str, kind: Any) -> Any:
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
        if kind == tuple[str, ...]:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError:
        raise InvalidArgument(f"{key}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None


__all__ = ["Settings"]
