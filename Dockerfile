# syntax=docker/dockerfile:1
#
# Images of the DeepSpeedInference operator and of the worker that runs in the Ray pods.
#
#   docker build --target operator -t ghcr.io/deepspeed-inference-operator/operator:0.1.0 .
#   docker build --target worker   -t ghcr.io/deepspeed-inference-operator/worker:0.1.0 .
#
# Those are the names the chart (image.repository) and the operator (spec.image default)
# use; replace the registry with yours and push.
#
# The machines this project is developed and tested on have no Docker engine: CI lints this
# file with hadolint (tests/tools/test_chart_images.py) but never builds it. hack/kind-e2e.sh
# builds both targets on a machine that has Docker.
#
# Both base images are pinned by tag; pin them by digest too (FROM image:tag@sha256:...)
# when you mirror them into your own registry.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# A CUDA 12 runtime image with Ray 2.60.0 on Python 3.11, matching ray[serve]==2.60.0 in
# worker/pyproject.toml. DeepSpeed's fused kernels (spec.kernelInject: true) are JIT-compiled
# and need nvcc: build with --build-arg RAY_IMAGE=<a CUDA *devel* image with Ray> for that.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128

# ---------------------------------------------------------------------------------------
# wheel: builds one wheel per image, each from its own pyproject.toml: dsi-operator
# (operator/) and dsi-worker (worker/, with the few pure dsi_operator modules it imports).
# Neither holds dsi_localcluster or the dev/test tools; tests/tools/test_packaging.py checks
# the wheels' files and Requires-Dist.
# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY operator/ operator/
COPY worker/ worker/
# The requirement files name the built wheels (their file names carry the version from
# operator/dsi_operator/_version.py), so no version is repeated in this file.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/operator ./operator \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/worker ./worker \
    && printf '/wheels/%s\n' "$(basename /wheels/operator/*.whl)" > /wheels/operator/operator.txt \
    && printf '/wheels/%s\n' "$(basename /wheels/worker/*.whl)" > /wheels/worker/worker.txt

# ---------------------------------------------------------------------------------------
# operator: the kopf controller. The dsi-operator wheel pulls kopf, kubernetes, pydantic,
# prometheus-client and PyYAML only -- no torch, ray or deepspeed (a small image).
# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="dsi-operator" \
      org.opencontainers.image.description="Kubernetes operator for DeepSpeed inference on KubeRay" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A fixed numeric uid/gid so the chart's runAsNonRoot check can verify it (runAsUser 10001).
RUN groupadd --system --gid 10001 dsi \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin dsi
COPY --from=wheel /wheels/operator /wheels
RUN pip install --no-cache-dir --requirement /wheels/operator.txt \
    && rm -rf /wheels
USER 10001:10001
# 8080: kopf liveness (/healthz); 9090: Prometheus metrics (/metrics).
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "dsi_operator"]
CMD ["--all-namespaces", "--standalone", "--liveness=http://0.0.0.0:8080/healthz"]

# ---------------------------------------------------------------------------------------
# worker: Ray head and GPU worker pods. Ray Serve imports dsi_worker.app:build_app from it.
# ---------------------------------------------------------------------------------------
FROM ${RAY_IMAGE} AS worker
LABEL org.opencontainers.image.title="dsi-worker" \
      org.opencontainers.image.description="Ray Serve + DeepSpeed tensor-parallel inference worker" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DS_BUILD_OPS=0
# The rayproject/ray images already run as the non-root user "ray" (uid 1000); say so
# explicitly so a changed base cannot silently switch to root.
USER 1000
COPY --from=wheel /wheels/worker /wheels
# The dsi-worker wheel pins ray[serve], torch, deepspeed, transformers and tokenizers.
RUN pip install --no-cache-dir --requirement /wheels/worker.txt \
    && python -c "import dsi_worker, deepspeed, torch, ray; print('worker image ok', torch.__version__)"
WORKDIR /home/ray
