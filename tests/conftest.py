"""Test-session settings that must be in place before Ray or vLLM is imported anywhere."""

from __future__ import annotations

import os

import pytest

# Ray reads this once, at import: with it, a local node uses 127.0.0.1 and its servers listen on
# loopback only (without it Ray picks the machine's external address).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster on loopback (127.0.0.1 only), shared by every test that needs one."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=4, include_dashboard=False, log_to_driver=False
        )  # logical slots: 2 workers + an LLM actor
    addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
    assert addresses == {"127.0.0.1"}, f"Ray is not on loopback: {addresses}"
    yield ray
    if started:
        ray.shutdown()
