"""LoRA (``learner.lora``): the learner trains adapters only; every engine, checkpoint and replica
sees one plain model whose weights are base + adapter delta, exactly as peft's own merge computes
them; a checkpoint keeps the adapters so a resumed learner rebuilds the very same model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppg.config import load_config
from ppg.learner.checkpoint import latest_checkpoint, load_state, save_checkpoint, validate_checkpoint
from ppg.learner.loop import load_policy_model
from ppg.learner.lora import ADAPTER, apply_lora, policy_state_dict
from ppg.learner.metrics import read_metrics
from ppg.models import resolve_model
from ppg.rollout.engine import load_state_dict


@pytest.fixture(scope="module")
def base_path():
    return resolve_model("embedded:tiny")


def adapted(base_path, seed=0):
    """A LoRA model whose adapters are not zero (as after some training)."""
    config = load_config(None, ["learner.lora.rank=4", "learner.lora.alpha=8"])
    model = apply_lora(
        AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), config.learner.lora
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return config, model


def test_adapters_train_alone_and_the_published_weights_are_peft_s_own_merge(base_path):
    config, model = adapted(base_path)
    base = load_state_dict(base_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "only the adapters train"

    merged = policy_state_dict(model)
    assert merged.keys() == base.keys(), "the base model's own names and nothing else"
    peft_merge = copy.deepcopy(model).merge_and_unload().state_dict()
    assert all(torch.equal(merged[k], peft_merge[k]) for k in merged)
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed), "embeddings and norms untouched"
    # computing the merge leaves the base weights as they were (no merge/unmerge drift)
    again = policy_state_dict(model)
    assert all(torch.equal(again[k], merged[k]) for k in merged)


def test_a_checkpoint_is_a_plain_model_and_a_resumed_learner_rebuilds_it_exactly(base_path, tmp_path):
    config, model = adapted(base_path, seed=1)
    checkpoint = save_checkpoint(
        tmp_path, 3, model, AutoTokenizer.from_pretrained(base_path), {}, {"iteration": 3}, config
    )
    assert (checkpoint / ADAPTER / "adapter_config.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(validate_checkpoint(checkpoint), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)

    loop_config = {"reference_path": str(base_path), "policy_path": str(checkpoint / "policy")}
    resumed = load_policy_model(config, loop_config, str(checkpoint))
    want, got = policy_state_dict(model), policy_state_dict(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)
    mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)

    # a checkpoint saved without adapters cannot continue as LoRA
    with pytest.raises(FileNotFoundError, match="no LoRA adapters"):
        load_policy_model(config, loop_config, str(tmp_path))


def test_missing_peft_is_a_config_error_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"learner\.lora.*pip install 'ppg\[lora\]'"):
        load_config(None, ["learner.lora.rank=8"])


@pytest.mark.slow
def test_lora_trains_publishes_to_vllm_and_resumes_through_ray_train(ray_cluster, base_path, tmp_path):
    from ppg.driver import train

    tiny = [
        "problem.name=myopic",
        "rollout.episodes_per_iteration=8",
        "rollout.group_size=4",
        "rollout.num_workers=1",
        "rollout.max_tokens_per_turn=8",
        "run.checkpoint_every=1",
        "run.final_eval_episodes=0",
        "learner.lora.rank=4",
        "learner.lr=0.01",
        f"run.output_dir={tmp_path}",
        "run.iterations=1",
    ]
    run = train(load_config(None, tiny), run_dir=tmp_path / "lora")
    run = train(resume=run, overrides=["run.iterations=2"])
    rows = read_metrics(run)
    assert [r["iteration"] for r in rows] == [0, 1] and all(r["weights_acked_by"] == 1 for r in rows)
    final = latest_checkpoint(run)
    assert load_state(final)[0]["policy_version"] == 2 and (final / ADAPTER).is_dir()
    trained, base = load_state_dict(final / "policy"), load_state_dict(base_path)
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed), "only adapted weights moved"
