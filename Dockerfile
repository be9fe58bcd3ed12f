# syntax=docker/dockerfile:1
# The one modelfleet image: every service and worker (`modelfleet serve <svc>`,
# `modelfleet worker <kind>`). The manifests in deploy/k8s refer to it as
#   modelfleet:<version>        docker build -t modelfleet:0.1.0 .
#   modelfleet:<version>-cuda   docker build -t modelfleet:0.1.0-cuda \
#                                 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# (<version> is the one in pyproject.toml.) CUDA wheels of torch carry their own
# CUDA runtime, so the same slim base serves both; only the node driver is needed.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned, from its own index: the package's range then admits it
# and pip does not pull a different build from PyPI.
RUN pip install --index-url ${TORCH_INDEX_URL} torch==${TORCH_VERSION}
COPY . /src
RUN pip install /src

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="modelfleet" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric uid/gid so Kubernetes' runAsNonRoot can verify the user.
RUN groupadd --gid 10001 modelfleet \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin modelfleet \
    && mkdir -p /var/lib/modelfleet/artifacts \
    && chown -R 10001:10001 /var/lib/modelfleet
COPY --from=build /opt/venv /opt/venv
# HOME=/tmp: the root filesystem is read-only in Kubernetes and /tmp is the
# writable emptyDir, so caches (torch, pip) land there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MODELFLEET_ARTIFACT_ROOT=/var/lib/modelfleet/artifacts
WORKDIR /var/lib/modelfleet
USER 10001:10001
EXPOSE 8001 8002 50051 50052 50053
ENTRYPOINT ["modelfleet"]
CMD ["--help"]
