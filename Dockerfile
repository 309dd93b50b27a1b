# syntax=docker/dockerfile:1
# The rerank worker: one process per GPU, `rerank-consumer` (settings: RERANK_* variables).
# Used by deploy/compose/; see docs/operations.md.
#
# Base image: a pinned python slim image plus torch from PyPI, not an nvidia/cuda image.
# torch's Linux x86_64 wheels on PyPI depend on the nvidia-* wheels (CUDA runtime, cuBLAS,
# cuDNN, NCCL, ...), so pip brings the CUDA user-space libraries in exactly the versions
# torch was built and tested against. All the container needs from the host is the NVIDIA
# driver, which the NVIDIA Container Toolkit mounts at run time (compose: a GPU device
# reservation; docker run: --gpus). An nvidia/cuda runtime base would add a second set of
# CUDA libraries (gigabytes) that torch does not load, and a second version to keep in step
# with the host driver. The same image runs on CPU (RERANK_DEVICE=cpu) without a GPU.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.15.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, in a layer of its own: it is most of the image and changes least often.
RUN python -m venv /opt/venv && pip install "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumer ./consumer
COPY producer_sdk ./producer_sdk
COPY kafka_common ./kafka_common
COPY schemas ./schemas
COPY gateway ./gateway
# tracing: RERANK_TRACING=otlp works in the image as documented (docs/operations.md)
RUN pip install ".[worker,gateway,tracing]"

FROM ${PYTHON_IMAGE}
ARG UID=10001
# A dedicated non-root user. The cache folders are created here, owned by that user, so that
# a named volume mounted on them starts with the same owner (Docker copies it from the image).
RUN groupadd --system --gid "${UID}" rerank \
 && useradd --system --uid "${UID}" --gid rerank --create-home --home-dir /home/rerank \
      --shell /usr/sbin/nologin rerank \
 && install -d -o rerank -g rerank -m 0750 \
      /var/cache/rerank /var/cache/rerank/huggingface /var/cache/rerank/compile
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/rerank/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/rerank/compile/inductor \
    TRITON_CACHE_DIR=/var/cache/rerank/compile/triton \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RERANK_HTTP_HOST=0.0.0.0 \
    RERANK_HTTP_PORT=8080
# HF_HOME holds the downloaded model; the compile caches make a restart skip most of
# torch.compile's warm-up. Both outlive the container.
VOLUME ["/var/cache/rerank/huggingface", "/var/cache/rerank/compile"]
# Numeric, so that a runtime (Kubernetes runAsNonRoot) can tell it is not root.
USER ${UID}:${UID}
WORKDIR /home/rerank
EXPOSE 8080
# Ready = model loaded and the consumer in its group. A long start period: the first start
# downloads the model and compiles it. python's urllib, so the image needs no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --start-interval=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RERANK_HTTP_PORT', '8080') + '/health/ready', timeout=4)"]
# SIGTERM (Docker's default stop signal) makes the worker drain: finish in-flight requests,
# commit, leave the group. Give it more than RERANK_DRAIN_TIMEOUT_S (docker stop -t, or
# stop_grace_period in compose).
ENTRYPOINT ["rerank-consumer"]
