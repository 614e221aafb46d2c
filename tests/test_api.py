"""The Python API: ``from ppg.api import load_config, train, evaluate`` gives the commands' own
functions (``ppg train`` runs ``ppg.driver.train``: tests/test_plugins.py runs it end to end)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ppg
from ppg.api import evaluate, load_config, train


def test_the_api_is_the_commands_own_functions():
    import ppg.api

    assert ppg.api.__all__ == ["evaluate", "load_config", "train"]
    assert train is sys.modules["ppg.driver"].train
    assert evaluate is sys.modules["ppg.evaluate"].evaluate
    assert load_config is sys.modules["ppg.config"].load_config
    assert load_config(None, ["run.iterations=3"]).run.iterations == 3


def test_importing_the_package_stays_light_and_the_api_sets_ray_loopback_first():
    """Every Ray worker imports ``ppg``: it must not load Ray Train, Serve or transformers. The API
    must, on its own (no conftest), set the variable Ray reads at import before Ray comes in."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(ppg.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    code = (
        "import sys; import ppg; heavy = [m for m in ('ray', 'torch', 'transformers') if m in sys.modules]; "
        "from ppg.api import evaluate, load_config, train; import os; "
        "print(os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'], heavy, 'ray.train' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["0", "[]", "True"]
