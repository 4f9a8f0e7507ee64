# syntax=docker/dockerfile:1
# Berth images. One file, three targets:
#   docker build --target cpu  -t berth:cpu  .
#   docker build --target cuda -t berth:cuda --build-arg CUDA_ARCHITECTURES="80;86;89;90" .
#   docker build --target rocm -t berth:rocm --build-arg GPU_TARGETS="gfx90a;gfx942;gfx1100" .
# Each target compiles llama-cpp-python for its backend in a build stage and copies only the
# installed virtual environment into a slim runtime stage that runs as a non-root user.

ARG PYTHON_VERSION=3.11
ARG CUDA_VERSION=12.6.3
ARG ROCM_VERSION=6.3.3
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36

# ---------------------------------------------------------------------------------------------
# The project's source, once for every build stage.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY registry /src/registry
COPY server /src/server
COPY cli /src/cli
COPY migrations /src/migrations

# ---------------------------------------------------------------------------------------------
# CPU
FROM python:${PYTHON_VERSION}-slim-bookworm AS cpu-build
ARG LLAMA_CPP_PYTHON_VERSION
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/berth
ENV PATH=/opt/berth/bin:$PATH
# Portable CPU build: runtime dispatch instead of -march=native, so the image runs on older CPUs.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
RUN pip install --no-cache-dir "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
COPY --from=source /src /src
WORKDIR /src
# The project itself: its dependencies are pinned in pyproject.toml, not here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[model]"

FROM python:${PYTHON_VERSION}-slim-bookworm AS cpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /home/berth --uid 10001 berth \
    && mkdir -p /data && chown berth:berth /data
COPY --from=cpu-build /opt/berth /opt/berth
ENV PATH=/opt/berth/bin:$PATH \
    BERTH_HOST=0.0.0.0:11434 \
    BERTH_MODELS=/data/models \
    BERTH_HOME=/data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 11434
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:11434/"]
ENTRYPOINT ["berth"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# CUDA (NVIDIA): compile against the CUDA devel image, run on the runtime image.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS cuda-build
ARG LLAMA_CPP_PYTHON_VERSION
ARG CUDA_ARCHITECTURES="75;80;86;89;90"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/berth
ENV PATH=/opt/berth/bin:$PATH
ENV CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} -DGGML_NATIVE=OFF"
RUN pip install --no-cache-dir "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
COPY --from=source /src /src
WORKDIR /src
# The project itself: its dependencies are pinned in pyproject.toml, not here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[model]"

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /home/berth --uid 10001 berth \
    && mkdir -p /data && chown berth:berth /data
COPY --from=cuda-build /opt/berth /opt/berth
ENV PATH=/opt/berth/bin:$PATH \
    BERTH_HOST=0.0.0.0:11434 \
    BERTH_MODELS=/data/models \
    BERTH_HOME=/data \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
VOLUME ["/data"]
EXPOSE 11434
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:11434/"]
ENTRYPOINT ["berth"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# ROCm (AMD): GGML_HIP is the switch llama.cpp reads (GGML_HIPBLAS is ignored and gives a CPU build).
FROM rocm/dev-ubuntu-24.04:${ROCM_VERSION}-complete AS rocm-build
ARG LLAMA_CPP_PYTHON_VERSION
ARG GPU_TARGETS="gfx90a;gfx942;gfx1030;gfx1100"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/berth
ENV PATH=/opt/berth/bin:$PATH
# hadolint ignore=DL3044
ENV HIPCXX=/opt/rocm/llvm/bin/clang HIP_PATH=/opt/rocm
ENV CMAKE_ARGS="-DGGML_HIP=on -DGPU_TARGETS=${GPU_TARGETS} -DGGML_NATIVE=OFF"
RUN pip install --no-cache-dir "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
COPY --from=source /src /src
WORKDIR /src
# The project itself: its dependencies are pinned in pyproject.toml, not here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[model]"

FROM rocm/dev-ubuntu-24.04:${ROCM_VERSION} AS rocm
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /home/berth --uid 10001 berth \
    && usermod -aG video,render berth \
    && mkdir -p /data && chown berth:berth /data
COPY --from=rocm-build /opt/berth /opt/berth
ENV PATH=/opt/berth/bin:$PATH \
    BERTH_HOST=0.0.0.0:11434 \
    BERTH_MODELS=/data/models \
    BERTH_HOME=/data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 11434
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:11434/"]
ENTRYPOINT ["berth"]
CMD ["serve"]
