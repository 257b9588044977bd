# The gateway image, which is also the CPU model server (it installs `.[cpu]`: onnxruntime).
# Build from the repository root (k8s/README.md):
#   docker build -f k8s/images/gateway.Dockerfile -t bluegreen:0.1.0 .
# Two stages: the first builds a virtual environment, the second is a slim Python with that environment copied
# in and nothing else (no pip cache, no compilers, no source tree).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/bluegreen
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY serving/ serving/
COPY loadtests/ loadtests/
# The model build recipes only: models/repository is built by the model servers' init container.
COPY models/*.py models/
RUN /opt/bluegreen/bin/pip install --no-compile ".[cpu]"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 bluegreen \
    && useradd --system --uid 10001 --gid bluegreen --no-create-home --shell /usr/sbin/nologin bluegreen
COPY --from=build /opt/bluegreen /opt/bluegreen
ENV PATH=/opt/bluegreen/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# Gateway data and admin listeners; a model server listens on 8000 (k8s/base).
EXPOSE 8080 8081 8000
ENTRYPOINT ["bluegreen"]
CMD ["gateway"]
