"""benchmarks/learner_device.py on the CPU (the GPU run is issue 18 item 5, for a lent device): every
memory option runs ppg's real update path on a Qwen2-shaped model, and the options that must not
change the update (gradient checkpointing, micro-batches) give the very same losses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "learner_device.py"


def load():
    spec = importlib.util.spec_from_file_location("learner_device", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_options_run_ppgs_update_and_leave_it_unchanged(tmp_path):
    bench = load()
    argv = ["--device", "cpu", "--shapes", "tiny", "--steps", "2", "--episodes", "16", "--prompt-tokens", "12",
            "--reply-tokens", "6", "--precision", "fp32", "--out", str(tmp_path)]  # fmt: skip
    rows = {r["option"]: r for r in bench.main(argv)}
    assert set(rows) == set(bench.OPTIONS)
    same = ["none", "gradient checkpointing", "micro-batches of 8"]  # 16 episodes: 2 micro-batches
    for side in ("ppg", "plain"):
        losses = [rows[o][f"{side}_loss"] for o in same]  # after 3 identical updates each
        assert losses == pytest.approx([losses[0]] * 3, rel=1e-5, abs=1e-6), (side, losses)
    assert rows["lora r=16"]["parameters"] > rows["none"]["parameters"]  # the adapters' own weights
    for r in rows.values():
        assert r["ppg_s"] > 0 and r["plain_s"] > 0 and r["overhead"] == r["ppg_s"] / r["plain_s"]
    table = (tmp_path / "learner_device.md").read_text()
    assert table.count("| tiny |") == 4 and "n/a" in table  # no GPU memory figures on the CPU


def test_a_batch_goes_to_the_models_device():
    from ppg.episode import Episode, collate

    episode = Episode(
        "p", "a", 0, 0, [], [1.0], [0], [5, 6, 7], [False, True, True], [0, 0, 0], [0.0, -1.0, -2.0]
    )
    batch = collate([episode])
    on_meta = batch.to("meta")
    for name, value in vars(on_meta).items():
        assert value.device == torch.device("meta"), name
    same = batch.to("cpu")
    for name, value in vars(batch).items():
        assert torch.equal(getattr(same, name), value), name
