# The GPU model server: CUDA and cuDNN runtime libraries under `.[gpu]` (onnxruntime-gpu).
# Build from the repository root (k8s/README.md):
#   docker build -f k8s/images/model-server-cuda.Dockerfile -t registry.example.com/bluegreen/model-server-cuda:0.1.0 .
# onnxruntime-gpu 1.19 and later are built against CUDA 12 and cuDNN 9: the runtime base below carries both
# (keep them in step when either moves). The CUDA base has no Python: both stages install Ubuntu's python3.11
# package (its default python3 is 3.10, below the project's 3.11), so the virtual environment built in the first
# stage runs unchanged on the interpreter of the second, which gets no venv or build tooling.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/bluegreen
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY serving/ serving/
COPY loadtests/ loadtests/
COPY models/*.py models/
RUN /opt/bluegreen/bin/pip install --no-compile ".[gpu]"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 bluegreen \
    && useradd --system --uid 10001 --gid bluegreen --no-create-home --shell /usr/sbin/nologin bluegreen
COPY --from=build /opt/bluegreen /opt/bluegreen
ENV PATH=/opt/bluegreen/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["bluegreen"]
CMD ["serve-model", "--device", "cuda"]
