#!/usr/bin/env bash
# End-to-end check of the Dockerfile where there is no Docker engine and no registry:
#   1. a minimal Debian bookworm root filesystem (debootstrap; python3, venv, pip, CA certs) is
#      imported as a local base image, standing in for the CUDA PyTorch base;
#   2. the project image is built from it with buildah (BASE_IMAGE / TORCH_SPEC build args, the
#      local CPU torch wheel via deploy/wheels/, the host CA bundle as a build secret);
#   3. the container runs (podman + runc), as non-root, read-only root; /health/ready, the
#      image's HEALTHCHECK, auth and one POST /v1/calculate are checked, then a second run serves
#      user checkpoints from a /models volume; the image size is printed; everything is removed.
# BASE_WITH_TORCH=1 instead stands in for the CUDA PyTorch base more closely: torch is first
# installed into the base's system Python, and the build must reuse it (TORCH_SPEC is set to an
# uninstallable name, and the build log must show no torch download or install).
#
# Needs root and Debian's buildah, podman, runc and debootstrap:
#   apt-get install -y buildah podman runc debootstrap
# Usage: sudo deploy/test-image.sh            (about 10-20 min the first time, on 2 cores)
# Env:   WORK (scratch dir, /var/tmp/mlip-image-test), KEEP_BASE=1 (default: keep the base image
#        for the next run), KEEP_IMAGE=0, PORT=18000, TORCH_SPEC=torch==2.13.0, PYTHON (host python
#        used to fetch the torch wheel and, if none is shipped, write a random-weight checkpoint),
#        BASE_WITH_TORCH=0.
# Not part of `make test` (too slow, needs root tools); tests/test_deploy.py lints and checks YAML.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/var/tmp/mlip-image-test}
BASE_TAG=${BASE_TAG:-localhost/mlip-test-base:bookworm}
IMAGE=${IMAGE:-localhost/mlip-service:test}
NAME=${NAME:-mlip-image-test}
PORT=${PORT:-18000}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
KEEP_BASE=${KEEP_BASE:-1}
KEEP_IMAGE=${KEEP_IMAGE:-0}
BASE_WITH_TORCH=${BASE_WITH_TORCH:-0}
TORCH_BASE_TAG=${TORCH_BASE_TAG:-localhost/mlip-test-base:bookworm-torch}
API_KEY=test-key-$$
CTX=$WORK/context

log() { printf '\n=== %s  %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (buildah/podman/debootstrap)"
for tool in buildah podman runc debootstrap; do
    command -v "$tool" > /dev/null || die "$tool missing: apt-get install -y buildah podman runc debootstrap"
done
mkdir -p "$WORK"

# podman here: no crun (use runc), and the default ulimits cannot be set inside this sandbox.
cat > "$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$WORK/containers.conf
PODMAN=(podman --runtime runc)
BUILDAH=(buildah)

cleanup() {
    local rc=$?
    log "cleanup"
    "${PODMAN[@]}" rm -f -t 5 "$NAME" > /dev/null 2>&1 || true
    "${BUILDAH[@]}" rm --all > /dev/null 2>&1 || true
    if [ "$KEEP_IMAGE" != 1 ]; then  # KEEP_IMAGE=1 keeps the image and its cached build layers
        "${PODMAN[@]}" rmi -f "$IMAGE" > /dev/null 2>&1 || true
        "${PODMAN[@]}" image prune -f > /dev/null 2>&1 || true
    fi
    [ "$KEEP_BASE" = 1 ] || "${PODMAN[@]}" rmi -f "$TORCH_BASE_TAG" "$BASE_TAG" > /dev/null 2>&1 || true
    rm -rf "$CTX" "$WORK/rootfs" "$WORK/rootfs.tar" "$WORK/models"
    exit "$rc"
}
trap cleanup EXIT

log "tools: $(buildah --version); $(podman --version); $(runc --version | head -1)"

# --- 1. local base image ---------------------------------------------------------------------
if "${PODMAN[@]}" image exists "$BASE_TAG"; then
    log "base image $BASE_TAG exists (KEEP_BASE=1 from an earlier run); reusing it"
else
    MIRROR=$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    [ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    log "debootstrap bookworm from $MIRROR"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/archives/*.deb
    tar -C "$WORK/rootfs" --numeric-owner -cf "$WORK/rootfs.tar" .
    "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' "$WORK/rootfs.tar" "$BASE_TAG"
    rm -rf "$WORK/rootfs" "$WORK/rootfs.tar"
fi
"${PODMAN[@]}" images "$BASE_TAG"

# --- 2. build context: the working tree as git sees it, plus test-only extras ----------------
log "build context in $CTX"
rm -rf "$CTX" && mkdir -p "$CTX"
# Only what .dockerignore lets through anyway (benchmarks/ data etc. would just slow the copy).
git -C "$REPO" ls-files -z --cached --others --exclude-standard -- Dockerfile .dockerignore \
        pyproject.toml README.md mlip server training 'checkpoints/*.safetensors' 'checkpoints/*.md' \
    | tar -C "$REPO" --null --ignore-failed-read -T - -cf - | tar -C "$CTX" -xf -
mkdir -p "$CTX/checkpoints" "$CTX/deploy/wheels"
if ! ls "$CTX"/checkpoints/*.safetensors > /dev/null 2>&1; then
    log "no shipped checkpoint yet: writing a random-weight one into the context (never committed)"
    (cd "$CTX" && "$PYTHON" -c "import torch; from mlip import MLIPModel, ModelConfig, save_checkpoint; torch.manual_seed(0); save_checkpoint('checkpoints/aspirin-rmd17.safetensors', MLIPModel(ModelConfig(species=[1,6,8])))")
fi
# The CPU torch wheel the host's pip resolves (here: /opt/wheels, via pip's find-links).
"$PYTHON" -m pip download --no-deps --only-binary=:all: -d "$CTX/deploy/wheels" "$TORCH_SPEC" 2>&1 | tail -2
ls -la "$CTX/checkpoints" "$CTX/deploy/wheels"

SECRET=()
[ -s "$CA_BUNDLE" ] && SECRET=(--secret "id=pip_cert,src=$CA_BUNDLE")
BUILD_TORCH_SPEC=$TORCH_SPEC
if [ "$BASE_WITH_TORCH" = 1 ]; then
    # Like pytorch/pytorch:*: torch preinstalled in the base's own Python.
    if ! "${PODMAN[@]}" image exists "$TORCH_BASE_TAG"; then
        log "base with torch preinstalled: $TORCH_BASE_TAG"
        ctr=$("${BUILDAH[@]}" from --pull=never "$BASE_TAG")
        "${BUILDAH[@]}" run --isolation chroot -v "$CTX/deploy/wheels:/wheels:ro" \
            -v "$CA_BUNDLE:/etc/host-ca.crt:ro" --env PIP_CERT=/etc/host-ca.crt "$ctr" -- \
            python3 -m pip install -q --no-cache-dir --break-system-packages --find-links /wheels "$TORCH_SPEC"
        "${BUILDAH[@]}" commit --rm "$ctr" "$TORCH_BASE_TAG"
    fi
    BASE_TAG=$TORCH_BASE_TAG
    BUILD_TORCH_SPEC=torch-must-not-be-installed  # would fail the build if it were used
    rm -f "$CTX"/deploy/wheels/*.whl
fi

# --- 3. build -------------------------------------------------------------------------------
log "buildah bud (base $BASE_TAG)"
start=$(date +%s)
"${BUILDAH[@]}" bud --isolation chroot --format docker --layers \
    --build-arg BASE_IMAGE="$BASE_TAG" --build-arg TORCH_SPEC="$BUILD_TORCH_SPEC" \
    "${SECRET[@]}" -f "$CTX/Dockerfile" -t "$IMAGE" "$CTX" 2>&1 | tee "$WORK/build.log"
log "built in $(( $(date +%s) - start )) s"
if [ "$BASE_WITH_TORCH" = 1 ]; then
    grep -E '^torch==' "$WORK/build.log" | head -1 | sed 's/^/constraint from the base: /'
    if grep -iE '(Downloading|Installing collected packages:.*|Processing .*)\btorch\b' "$WORK/build.log"; then
        die "the build installed torch although the base has it"
    fi
    echo "torch was not downloaded or installed by the build (the base's is reused)"
fi
"${PODMAN[@]}" images "$IMAGE"
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
base_size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$BASE_TAG")
log "image size: $(( size / 1000000 )) MB (base $(( base_size / 1000000 )) MB)"
"${PODMAN[@]}" image inspect --format 'User={{.Config.User}} Entrypoint={{.Config.Entrypoint}} Cmd={{.Config.Cmd}} ExposedPorts={{.Config.ExposedPorts}} Volumes={{.Config.Volumes}}' "$IMAGE"
"${PODMAN[@]}" image inspect --format 'Healthcheck={{.Config.Healthcheck}}' "$IMAGE" 2>/dev/null \
    || "${PODMAN[@]}" image inspect --format '{{json .}}' "$IMAGE" | grep -o '"Healthcheck":{[^}]*}' | head -1
"${PODMAN[@]}" image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" \
    | grep -iE 'key|secret|token|cert' && die "secret-like ENV in the image" || echo "no secret-like ENV in the image"
"${PODMAN[@]}" run --rm --network none --no-healthcheck --entrypoint /bin/sh "$IMAGE" -c \
    'id; ls /run/secrets 2>/dev/null; ls /wheels 2>/dev/null; python -c "import torch, mlip; print(\"torch\", torch.__version__, \"from\", torch.__file__, \"mlip\", mlip.__version__)"; mlip --help | head -3'

if [ ! -f "$REPO/server/cli.py" ] && ! grep -q '"serve"' "$REPO/mlip/cli.py"; then
    log "server not there yet (no server/cli.py): image build and smoke test only"
    exit 0
fi

# --- 4. run and probe -----------------------------------------------------------------------
# Host networking: this sandbox has no bridge/port-forwarding; on a real host use -p 8000:8000.
# Read-only root filesystem with a tmpfs /tmp, as in deploy/k8s (readOnlyRootFilesystem).
# (podman prints "unable to get systemd connection to add healthchecks": no systemd here to
# schedule the HEALTHCHECK; it is run by hand below.)
URL=http://127.0.0.1:$PORT
start_container() {  # NAME, then extra `podman run` arguments
    local name=$1; shift
    "${PODMAN[@]}" rm -f "$name" > /dev/null 2>&1 || true
    "${PODMAN[@]}" run -d --name "$name" --network host --read-only --tmpfs /tmp \
        -e MLIP_PORT="$PORT" -e MLIP_DEVICE=cpu -e MLIP_API_KEY="$API_KEY" "$@" "$IMAGE"
}
wait_ready() {  # NAME; prints the /health/ready body
    local name=$1 body
    for _ in $(seq 1 180); do
        if body=$(curl -fsS "$URL/health/ready" 2>/dev/null); then echo "$body"; return 0; fi
        [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] \
            || { "${PODMAN[@]}" logs "$name" 2>&1 | tail -30; die "container $name exited"; }
        sleep 1
    done
    "${PODMAN[@]}" logs "$name" 2>&1 | tail -30; die "$name not ready after 180 s"
}

log "podman run: the shipped checkpoints (port $PORT)"
start_container "$NAME"
t0=$(date +%s)
ready=$(wait_ready "$NAME")
echo "GET /health/ready -> $ready  (after $(( $(date +%s) - t0 )) s)"
echo "GET /health/live  -> $(curl -fsS "$URL/health/live")"
echo "container user: $("${PODMAN[@]}" exec "$NAME" id)"
"${PODMAN[@]}" healthcheck run "$NAME" && echo "HEALTHCHECK (image's own command): healthy"

code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$URL/v1/calculate" -H 'Content-Type: application/json' -d '{}')
echo "POST /v1/calculate without key -> HTTP $code"
[ "$code" = 401 ] || [ "$code" = 403 ] || die "expected 401/403 without the API key"

# One water-like C/H/O structure (the test checkpoint knows H, C, O).
BODY='{"structures": [{"numbers": [8, 1, 1], "positions": [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]}]}'
resp=$(curl -fsS -X POST "$URL/v1/calculate" -H "Authorization: Bearer $API_KEY" \
    -H 'Content-Type: application/json' -d "$BODY") || { "${PODMAN[@]}" logs "$NAME" | tail -30; die "calculate failed"; }
echo "POST /v1/calculate -> ${resp:0:600}"
echo "$resp" | grep -q '"energy"' || die "no energy in the response"
"${PODMAN[@]}" logs "$NAME" 2>&1 | tail -8
t0=$(date +%s)
"${PODMAN[@]}" stop -t 20 "$NAME" > /dev/null
echo "podman stop (SIGTERM): exit code $("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$NAME") after $(( $(date +%s) - t0 )) s"
"${PODMAN[@]}" rm -f "$NAME" > /dev/null

# --- 5. user checkpoints from a volume at /models -------------------------------------------
log "podman run: user checkpoints mounted at /models, MLIP_MODELS=/models"
rm -rf "$WORK/models" && mkdir -p "$WORK/models"
first=$(ls "$CTX"/checkpoints/*.safetensors | head -1)
cp "$first" "$WORK/models/user-model.safetensors"
chmod -R a+rX "$WORK/models"
start_container "$NAME" -v "$WORK/models:/models:ro" -e MLIP_MODELS=/models
ready=$(wait_ready "$NAME")
echo "GET /health/ready -> $ready"
echo "$ready" | grep -q '"user-model"' || die "the mounted checkpoint is not served"
echo "GET /v1/models -> $(curl -fsS -H "Authorization: Bearer $API_KEY" "$URL/v1/models" | head -c 400)"
"${PODMAN[@]}" rm -f -t 10 "$NAME" > /dev/null
log "OK: image $IMAGE ($(( size / 1000000 )) MB) built, ran as non-root, ready, calculated"
