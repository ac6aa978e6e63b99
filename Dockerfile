# mlip-service: `mlip serve` (HTTP/WebSocket potential server) on a CUDA-enabled PyTorch base.
#
#   docker build -t mlip-service .
#   docker run --gpus all -p 8000:8000 -e MLIP_API_KEY=... mlip-service
#
# Configuration is by MLIP_* environment variables (server/settings.py); see README "Deploy".
# No secrets are baked in: pass MLIP_API_KEY / MLIP_API_KEYS_FILE at run time.
#
# BASE_IMAGE needs python3 (>= 3.10) with venv and pip. On the default CUDA PyTorch base the
# preinstalled torch is reused as is: the project goes into a venv that sees the base's
# site-packages, with the base's exact torch version as a pip constraint, so pip can neither
# replace it nor pull a second torch. On a base without torch (plain Debian, CPU-only), torch is
# installed from TORCH_SPEC (e.g. torch==2.13.0), from deploy/wheels/ if a wheel is put there.
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

# Used only when BASE_IMAGE has no torch.
ARG TORCH_SPEC=torch
# The project's extras: add cuda (CUDA 12 torch, as the default base) or cuda13 for cuEquivariance's GPU
# kernels, served with MLIP_KERNELS=cueq: --build-arg MLIP_EXTRAS=server,cuda
ARG MLIP_EXTRAS=server
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Optional local wheels (builder stage only; never copied into the final image).
COPY deploy/wheels/ /wheels/

# A private CA bundle for pip (e.g. behind a TLS-inspecting proxy) comes in as a build secret:
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt .
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv --system-site-packages /opt/venv \
    && if ! /opt/venv/bin/python -c "import torch" 2>/dev/null; then \
           /opt/venv/bin/pip install --find-links /wheels "${TORCH_SPEC}"; \
       fi \
    && /opt/venv/bin/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
       > /opt/torch-constraint.txt \
    && cat /opt/torch-constraint.txt

WORKDIR /src
# Dependencies first (cached until pyproject.toml or the version changes) ...
COPY pyproject.toml README.md ./
COPY mlip/__init__.py mlip/__init__.py
# (empty stand-ins for the folders pyproject.toml maps to mlip.server, mlip.training, mlip.checkpoints)
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && mkdir -p server training checkpoints \
    && /opt/venv/bin/pip install --constraint /opt/torch-constraint.txt --find-links /wheels ".[${MLIP_EXTRAS}]"
# ... then the project itself: a regular (non-editable) install, no dependency changes.
COPY . .
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/venv/bin/pip install --no-deps --force-reinstall . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/mlip --help > /dev/null \
    && mkdir -p checkpoints \
    && chmod -R u=rwX,go=rX checkpoints

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG MLIP_UID=10001
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN groupadd --gid "${MLIP_UID}" mlip \
    && useradd --no-log-init --uid "${MLIP_UID}" --gid mlip --create-home --home-dir /home/mlip \
        --shell /usr/sbin/nologin mlip \
    && mkdir -p /models /app \
    && chown "${MLIP_UID}:${MLIP_UID}" /models

COPY --from=builder /opt/venv /opt/venv
# The shipped checkpoints and model cards (world-readable, whatever their mode in the context;
# owned by root, so read-only for the service user).
COPY --from=builder /src/checkpoints/ /app/checkpoints/

# MLIP_MODELS serves every *.safetensors in one directory: the shipped ones by default; mount
# your own at /models and set MLIP_MODELS=/models. (MLIP_MODELS and MLIP_CHECKPOINT/--checkpoint
# exclude each other: to serve a single file, point MLIP_MODELS at a directory holding it.)
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLIP_HOST=0.0.0.0 \
    MLIP_PORT=8000 \
    MLIP_MODELS=/app/checkpoints

WORKDIR /app
VOLUME ["/models"]
USER ${MLIP_UID}:${MLIP_UID}
EXPOSE 8000

# curl may be absent from the base: probe with the venv's python. Start period covers model
# loading and the first CUDA initialisation.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('MLIP_PORT', '8000'), timeout=4)"]

# Same as `mlip serve --host 0.0.0.0`, but host/port/models stay overridable by MLIP_* variables
# (flags would win over them). Extra flags can be appended: `docker run IMAGE --device cuda:1`.
ENTRYPOINT ["mlip", "serve"]
