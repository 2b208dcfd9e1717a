# syntax=docker/dockerfile:1
# Qwen3-TTS server image.    docker compose up -d --build    (or: docker build -t qwen3-tts .)
#
# Base image: python:3.11-slim-bookworm, not nvidia/cuda. The PyPI builds of torch 2.9.1 / torchaudio 2.9.1 are
# CUDA 12.8 builds that bring their own CUDA runtime, cuBLAS, cuDNN and NCCL as nvidia-* wheels; the only NVIDIA
# piece they need from outside is the driver (libcuda.so, nvidia-smi), which the NVIDIA Container Toolkit mounts
# into the container from the host when the container is given a GPU. An nvidia/cuda:12.8-runtime base would add a
# second copy of the same CUDA libraries (about 3 GB) that torch never loads. Host requirement: an NVIDIA driver
# new enough for CUDA 12.8 (R570 or newer) and the NVIDIA Container Toolkit.
# Python 3.11, the version the tests run on.
#
# Stages: `builder` installs requirements.txt into /opt/venv; `flashattn-true` adds flash-attn (with a CUDA toolkit
# that stays in that stage), `flashattn-false` adds nothing; the runtime stage copies /opt/venv and nothing else,
# so pip, its caches and any compiler toolchain stay out of the image. BuildKit builds only the stage selected.
#   docker compose build --build-arg INSTALL_FLASH_ATTN=true     (slow: compiles unless a prebuilt wheel matches)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG INSTALL_FLASH_ATTN=false

# ---- builder: the project's requirements, in a virtual environment that moves to the runtime stage as is
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install -r /tmp/requirements.txt

# ---- flash-attn (optional): FlashAttention-2 kernels; the server uses them on CUDA when ATTN_IMPLEMENTATION=auto.
# flash-attn's setup downloads a prebuilt wheel matching torch/CUDA/Python when one exists, else compiles (an hour or
# more; FLASH_ATTN_CUDA_ARCHS limits it to the GPUs you have: 80 covers every 8.x GPU (A100, A10, L4, L40, RTX 30
# and 40), 90 = H100/H200).
FROM nvidia/cuda:12.8.1-devel-ubuntu22.04 AS cuda-toolkit

FROM builder AS flashattn-true
ARG FLASH_ATTN_VERSION=2.8.3
ARG FLASH_ATTN_CUDA_ARCHS="80;90"
ARG MAX_JOBS=4
COPY --from=cuda-toolkit /usr/local/cuda /usr/local/cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
ENV CUDA_HOME=/usr/local/cuda \
    PATH=/usr/local/cuda/bin:${PATH} \
    FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS} \
    MAX_JOBS=${MAX_JOBS}
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install packaging ninja psutil wheel setuptools \
    && /opt/venv/bin/pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}" \
    && /opt/venv/bin/python -c "import flash_attn; print('flash-attn', flash_attn.__version__)"

FROM builder AS flashattn-false

# hadolint ignore=DL3006
FROM flashattn-${INSTALL_FLASH_ATTN} AS venv

# ---- runtime
FROM ${PYTHON_IMAGE}
ARG APP_UID=1000

# sox: qwen-tts imports the sox binding, which warns without the binary. libjemalloc2: the entrypoint preloads it
# (USE_JEMALLOC). gcc and libc6-dev: TORCH_COMPILE (on by default) runs Triton, which compiles a small C launcher
# with the system C compiler at the first compiled call; without one, compilation fails. taskset and setpriv come
# with util-linux, which the base image has. Versions float with Debian's security updates, hence no pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends sox libjemalloc2 gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid "${APP_UID}" app \
    && useradd --uid "${APP_UID}" --gid app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /models /data \
    && chown app:app /models /data

COPY --from=venv /opt/venv /opt/venv

# Model and compile caches live on the /models volume, so a restart neither downloads nor recompiles.
# NVIDIA_DRIVER_CAPABILITIES: the driver parts the toolkit mounts (compute: CUDA; utility: nvidia-smi); which GPUs
# the container sees is the compose GPU reservation's business (NVIDIA_VISIBLE_DEVICES is set from it).
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    TORCHINDUCTOR_CACHE_DIR=/models/torch-compile/inductor \
    TRITON_CACHE_DIR=/models/torch-compile/triton \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    DATA_DIR=/data \
    HOST=0.0.0.0 \
    PORT=8000 \
    APP_USER=app \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /app
COPY --chmod=755 docker-entrypoint.sh /app/docker-entrypoint.sh
COPY --chmod=644 server.py /app/server.py
COPY --chmod=644 static/index.html static/app.js static/app.css /app/static/
COPY --chmod=644 tools/build_tiny_checkpoints.py /app/tools/build_tiny_checkpoints.py

# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER ${APP_UID}:${APP_UID}
EXPOSE 8000
VOLUME ["/models", "/data"]

# Liveness: /health answers 200 at once whenever the server is up (also while the model loads). The probe follows
# the server: TCP, TLS (SSL_CERTFILE) or the Unix socket (UNIX_SOCKET_PATH).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/app/docker-entrypoint.sh", "healthcheck"]

ENTRYPOINT ["/app/docker-entrypoint.sh"]
CMD ["serve"]
