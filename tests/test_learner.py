"""The learner: exact sharded updates, staleness, checkpoints (atomic, validated), and `ppg train` end to
end in a real local Ray cluster - one full iteration, broadcast, checkpoint, and exact resume."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import scripted_episodes
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppg.config import LearnerConfig, load_config
from ppg.episode import collate
from ppg.learner.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    save_checkpoint,
    validate_checkpoint,
)
from ppg.learner.metrics import read_metrics
from ppg.learner.update import PolicyLearner, StaleEpisodeError, check_staleness, global_advantages
from ppg.models import resolve_model
from ppg.objectives import Greedy, GroupMean, Objective


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("embedded:tiny")


@pytest.fixture(scope="module")
def episodes(model_path):
    return scripted_episodes("myopic", num_personas=4)


def gradient_after_step(model_path, episodes, advantages, indices, world_size, reduction):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LearnerConfig(lr=1e-3, loss_reduction=reduction, grad_clip=1e9)
    learner = PolicyLearner(model, Objective(), config, total_steps=1, world_size=world_size)
    shard = collate([episodes[i] for i in indices])
    tokens = sum(sum(e.agent_mask) for e in episodes)
    learner.step(shard, advantages[indices], len(episodes), tokens)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_sharded_gradients_average_to_the_full_batch_gradient(model_path, episodes, reduction):
    """What DDP does (average of per-rank gradients) equals the single-process global-batch gradient."""
    advantages = global_advantages(episodes, Objective(policy_class=Greedy(), baseline=GroupMean()))
    full = gradient_after_step(model_path, episodes, advantages, list(range(8)), 1, reduction)
    rank0 = gradient_after_step(model_path, episodes, advantages, [0, 2, 4, 6], 2, reduction)
    rank1 = gradient_after_step(model_path, episodes, advantages, [1, 3, 5, 7], 2, reduction)
    for name, g in full.items():
        torch.testing.assert_close((rank0[name] + rank1[name]) / 2, g, rtol=1e-4, atol=1e-6)


def test_staleness_bound(episodes):
    old, new = copy.copy(episodes[0]), copy.copy(episodes[1])
    old.policy_version, new.policy_version = 3, 5
    assert check_staleness([old, new], version=5, max_staleness=2) == [old, new]
    assert check_staleness([old, new], version=5, max_staleness=1) == [new]
    new.policy_version = 6
    with pytest.raises(StaleEpisodeError, match="future policy version"):
        check_staleness([new], version=5, max_staleness=0)


def save(tmp_path, model_path, iteration, config=None):
    model = AutoModelForCausalLM.from_pretrained(model_path)
    state = {
        "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
        "torch_rng": [torch.get_rng_state()],
    }
    return save_checkpoint(
        tmp_path,
        iteration,
        model,
        model_path,
        state,
        {"iteration": iteration, "policy_version": iteration},
        config or load_config(),
    )


def test_checkpoint_round_trip_atomic_and_pruned(tmp_path, model_path):
    for i in (1, 2, 3):
        save(tmp_path, model_path, i)
    (tmp_path / "checkpoints" / ".iter_000004.tmp-123").mkdir()  # an interrupted write
    assert latest_checkpoint(tmp_path).name == "iter_000003"
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000002", "iter_000003"]
    policy = validate_checkpoint(latest_checkpoint(tmp_path))
    state, trainer_state = load_state(latest_checkpoint(tmp_path))
    assert state == {"iteration": 3, "policy_version": 3} and "optimizer" in trainer_state
    original = load_file(Path(model_path) / "model.safetensors")
    for k, v in load_file(policy / "model.safetensors").items():
        assert torch.equal(v, original[k])
    AutoModelForCausalLM.from_pretrained(policy)
    assert AutoTokenizer.from_pretrained(policy).chat_template


def test_bad_checkpoints_are_refused_clearly(tmp_path, model_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        validate_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no checkpoints"):
        latest_checkpoint(tmp_path)
    good = save(tmp_path, model_path, 1)

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: missing \['trainer_state.pt'\]"):
        validate_checkpoint(missing)

    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "policy" / "model.safetensors").rename(pickled / "policy" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only from safetensors"):
        validate_checkpoint(pickled)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    weights = corrupt / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        validate_checkpoint(corrupt)

    mismatched = tmp_path / "mismatched"
    shutil.copytree(good, mismatched)
    tok = json.loads((mismatched / "policy" / "tokenizer.json").read_text())
    start = len(tok["model"]["vocab"])
    tok["model"]["vocab"].update({f"extra{i}": start + i for i in range(5000)})
    (mismatched / "policy" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="tokenizer belongs to another model"):
        validate_checkpoint(mismatched)

    garbled = tmp_path / "garbled"
    shutil.copytree(good, garbled)
    (garbled / "trainer_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="trainer state is unreadable"):
        load_state(garbled)


# --- ppg train, end to end --------------------------------------------------------------------

TINY_RUN = [
    "problem.name=myopic",
    "rollout.episodes_per_iteration=8",
    "rollout.group_size=4",
    "rollout.num_workers=2",
    "rollout.requests_per_worker=1",
    "run.checkpoint_every=1",
    "run.keep_last=5",
    "rollout.max_tokens_per_turn=16",
    "run.final_eval_episodes=0",  # the async test below runs it
]


def load_iteration_split():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "iteration_split.py"
    spec = importlib.util.spec_from_file_location("iteration_split", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_train(tmp_path, name, overrides, resume=None):
    from ppg.driver import train

    if resume is not None:
        return train(resume=resume, overrides=overrides)
    config = load_config(None, TINY_RUN + [f"run.output_dir={tmp_path}", f"run.name={name}"] + overrides)
    return train(config, run_dir=tmp_path / name)


@pytest.mark.slow
def test_one_iteration_end_to_end_and_exact_resume(ray_cluster, tmp_path):
    straight = run_train(tmp_path, "straight", ["run.iterations=2"])
    rows = read_metrics(straight)
    assert [r["iteration"] for r in rows] == [0, 1] and [r["policy_version"] for r in rows] == [1, 2]
    assert all(r["weights_acked_by"] == 2 for r in rows), "every rollout worker got every version"
    assert all(r["episodes"] == 8 and r["dropped_stale"] == 0 for r in rows)
    assert (straight / "reward.png").read_bytes()[:4] == b"\x89PNG"
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in (straight / "checkpoints").iterdir()] and latest_checkpoint(
        straight
    ).name == "iter_000002"
    validate_checkpoint(latest_checkpoint(straight))
    parts = load_iteration_split().main([str(straight), "--out", str(tmp_path / "split")])
    assert sum(parts.values()) == pytest.approx(rows[1]["time_iteration"]) and parts["learner"] > 0
    assert (tmp_path / "split" / "iteration_split.png").is_file()

    interrupted = run_train(tmp_path, "interrupted", ["run.iterations=1"])
    resumed = run_train(tmp_path, "interrupted", ["run.iterations=2"], resume=interrupted)
    assert resumed == interrupted
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["batch_fingerprint"] for r in a] == [r["batch_fingerprint"] for r in b], (
        "same batches after resume"
    )
    wa = load_file(latest_checkpoint(straight) / "policy" / "model.safetensors")
    wb = load_file(latest_checkpoint(resumed) / "policy" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same parameters after the resumed update"


@pytest.mark.slow
def test_async_rollouts_resume_exactly(ray_cluster, tmp_path):
    """With run.async_rollouts the batch after a checkpoint is already being sampled, by the version
    before the checkpoint's, which a resumed run no longer has: the checkpoint carries those
    episodes, so a run resumed there trains on the same batches and ends with the same weights."""
    # one worker running two requests per batch (the default shape): new weights must not reach a
    # prefetched batch's second request, or the batches would depend on timing
    overlap = ["run.iterations=3", "rollout.num_workers=1", "rollout.requests_per_worker=2"]
    straight = run_train(
        tmp_path, "straight", [*overlap, "run.async_rollouts=true", "learner.max_staleness=1"]
    )
    saved = torch.load(straight / "checkpoints" / "iter_000001" / "trainer_state.pt", weights_only=True)
    prefetched = [e for r in saved["prefetched"] for e in r["episodes"]]
    assert len(prefetched) == 8 and {e["policy_version"] for e in prefetched} == {0}, "one version old"
    final = torch.load(straight / "checkpoints" / "iter_000003" / "trainer_state.pt", weights_only=True)
    following = [e for r in final["prefetched"] for e in r["episodes"]]  # for a run extended later
    assert len(following) == 8 and {e["policy_version"] for e in following} == {2}

    resumed = tmp_path / "resumed"  # the same run killed right after its first checkpoint
    shutil.copytree(straight, resumed)
    for later in ("iter_000002", "iter_000003"):
        shutil.rmtree(resumed / "checkpoints" / later)
    metrics = resumed / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    run_train(tmp_path, "resumed", [], resume=resumed)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["batch_fingerprint"] for r in a] == [r["batch_fingerprint"] for r in b], "same batches"
    assert [r["importance_weight"] for r in a] == [r["importance_weight"] for r in b]
    wa = load_file(latest_checkpoint(straight) / "policy" / "model.safetensors")
    wb = load_file(latest_checkpoint(resumed) / "policy" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same parameters after the resumed updates"


@pytest.mark.slow
def test_async_rollouts_with_two_ddp_learners_and_eval(ray_cluster, tmp_path, capsys):
    """Two learner ranks (real DDP over gloo), rollouts overlapping the update (one version stale,
    importance-weighted), samples every 2nd iteration, the run's closing held-out evaluation (final vs
    initial policy on its own pool), then `ppg eval` on the final checkpoint for two problems: it
    replays the run's evaluation exactly (same episodes, same weights)."""
    from ppg.cli import main

    run = run_train(
        tmp_path,
        "async",
        [
            "run.iterations=3",
            "learner.num_workers=2",
            "run.async_rollouts=true",
            "learner.max_staleness=1",
            "learner.off_policy=importance",
            "run.sample_every=2",
            "run.final_eval_episodes=8",
        ],
    )
    rows = read_metrics(run)
    assert [r["policy_version"] for r in rows] == [1, 2, 3] and all(r["dropped_stale"] == 0 for r in rows)
    assert rows[0]["importance_weight"] == 1.0  # the first batch is on-policy
    assert any(r["importance_weight"] != 1.0 for r in rows[1:]), "later batches are one version old"
    assert [p.name for p in (run / "samples").iterdir()] == ["iter_000002.md"]
    assert (run / "samples" / "iter_000002.md").read_text().count("| turn | user | agent | reward |") == 2
    trained = capsys.readouterr().out
    assert "[ppg] held-out evaluation: 8 episodes per policy" in trained and "-> final" in trained
    final = json.loads((run / "eval" / "report.json").read_text())
    assert final["checkpoint"] == str(latest_checkpoint(run)) and final["episodes"] == 8
    assert set(final["problems"]["myopic"]) >= {"checkpoint", "initial", "difference"}
    assert (run / "eval" / "samples.md").is_file() and (run / "eval" / "report.md").is_file()

    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(latest_checkpoint(run)), "--episodes", "8", "--out", str(out)]
    assert main(argv + ["--problem", "myopic", "--problem", "segmented"]) == 0
    printed = capsys.readouterr().out
    assert "held-out evaluation" in printed and "myopic" in printed and "segmented" in printed
    result = json.loads((out / "report.json").read_text())
    assert result["episodes"] == 8 and len(result["reward_per_turn"]) == 4
    assert -1.0 <= result["reward_mean"] <= 1.0 and result["held_out_personas"] == 12
    for name in ("myopic", "segmented"):
        entry = result["problems"][name]
        assert entry["checkpoint"]["behaviour"] and entry["initial"]["behaviour"]
        assert entry["difference"]["n"] == 8
    mine, theirs = result["problems"]["myopic"], final["problems"]["myopic"]
    for side in ("checkpoint", "initial"):
        assert mine[side]["reward_per_turn"] == theirs[side]["reward_per_turn"], side
    samples = (out / "samples.md").read_text()
    assert "## myopic" in samples and "## segmented" in samples and "| checkpoint | initial |" in samples


def test_kl_penalty_is_zero_against_itself_and_positive_against_another_policy(model_path, episodes):
    advantages = torch.zeros(len(episodes), 4)
    batch = collate(episodes)
    tokens = int(batch.agent_mask.sum())
    config = LearnerConfig(kl_coef=0.1, lr=1e-9)
    same = AutoModelForCausalLM.from_pretrained(model_path)
    learner = PolicyLearner(
        AutoModelForCausalLM.from_pretrained(model_path), Objective(), config, 1, reference=same
    )
    assert learner.step(batch, advantages, len(episodes), tokens).kl == pytest.approx(0.0, abs=1e-6)
    other = AutoModelForCausalLM.from_pretrained(model_path)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    learner = PolicyLearner(
        AutoModelForCausalLM.from_pretrained(model_path), Objective(), config, 1, reference=other
    )
    assert learner.step(batch, advantages, len(episodes), tokens).kl > 1e-3


def test_train_cli_refuses_bad_config_and_missing_run(tmp_path):
    exe = str(Path(sys.executable).with_name("ppg"))
    bad = subprocess.run([exe, "train", "learner.lr=-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "learner.lr: Input should be greater than 0" in bad.stderr
    missing = subprocess.run(
        [exe, "train", "--resume", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "config file" in missing.stderr
    (tmp_path / "config.yaml").write_text(load_config().to_yaml())
    empty = subprocess.run(
        [exe, "train", "--resume", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert empty.returncode == 2 and "has no checkpoints" in empty.stderr
    no_ckpt = subprocess.run(
        [exe, "eval", "--checkpoint", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert no_ckpt.returncode == 2 and "does not exist" in no_ckpt.stderr
    assert not (tmp_path / "nope").exists(), "a mistyped checkpoint path must not come into being"


def test_importance_weights_apply_only_to_stale_episodes(model_path, episodes):
    """On-policy episodes (sampled by the learner's own version) are never weighted: the sampler's
    log-probs differ from the learner's by numerical noise only, which must not enter the update."""
    advantages = global_advantages(episodes, Objective(policy_class=Greedy(), baseline=GroupMean()))
    tokens = sum(sum(e.agent_mask) for e in episodes)

    def grads(behaviour_noise: float, version: int | None):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        learner = PolicyLearner(model, Objective(), LearnerConfig(lr=1e-3, grad_clip=1e9), total_steps=1)
        batch = collate(episodes)
        if behaviour_noise is not None:
            batch.behaviour_logprobs = -1.0 + behaviour_noise * torch.rand(batch.token_ids.shape)
        learner.step(batch, advantages, len(episodes), tokens, version)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    version = episodes[0].policy_version
    plain = grads(None, None)
    assert torch.equal(grads(0.5, version), plain)  # on-policy: the sampler's log-probs are ignored
    assert not torch.allclose(grads(0.5, version + 1), plain)  # one version old: weighted


def test_ppo_baseline_first_epoch_is_the_policy_gradient_step(model_path, episodes):
    """learner.algorithm=ppo with one epoch takes exactly the policy gradient step; with four, each
    later step is clipped against the weights the batch was sampled with (reported per update)."""
    advantages = global_advantages(episodes, Objective())
    tokens = sum(sum(e.agent_mask) for e in episodes)

    def after(config: LearnerConfig):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        learner = PolicyLearner(model, Objective(), config, total_steps=1)
        stats = learner.step(collate(episodes), advantages, len(episodes), tokens)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), stats

    pg, _ = after(LearnerConfig(lr=1e-3))
    one, _ = after(LearnerConfig(lr=1e-3, algorithm="ppo", ppo_epochs=1))
    torch.testing.assert_close(one, pg, rtol=0, atol=1e-7)
    four, stats = after(LearnerConfig(lr=5e-2, algorithm="ppo", ppo_epochs=4, ppo_clip=0.1))
    assert not torch.allclose(four, pg) and 0 < stats.clip_fraction <= 1
    assert stats.lr == 5e-2  # one schedule step per batch, not per epoch


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_micro_batches_and_gradient_checkpointing_give_the_same_update(model_path, episodes, reduction):
    """Gradient accumulation over micro-batches (3 + 3 + 2 episodes) and recomputed activations are
    the same update as one forward over the batch, KL term included; bf16 autocast is close to it."""
    advantages = global_advantages(episodes, Objective(policy_class=Greedy(), baseline=GroupMean()))
    tokens = sum(sum(e.agent_mask) for e in episodes)

    def grads(checkpointing: bool = False, **options):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        with torch.no_grad():  # a reference that differs, so the KL term has a gradient
            for p in reference.parameters():
                p.add_(0.01 * torch.randn_like(p))
        config = LearnerConfig(lr=1e-3, grad_clip=1e9, loss_reduction=reduction, kl_coef=0.1, **options)
        learner = PolicyLearner(model, Objective(), config, total_steps=1, reference=reference)
        stats = learner.step(collate(episodes), advantages, len(episodes), tokens)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), stats

    whole, stats = grads()
    micro, micro_stats = grads(micro_batch_size=3)
    torch.testing.assert_close(micro, whole, rtol=1e-4, atol=1e-6)
    assert micro_stats.loss == pytest.approx(stats.loss, rel=1e-5) and micro_stats.kl == pytest.approx(
        stats.kl
    )
    torch.testing.assert_close(grads(checkpointing=True)[0], whole, rtol=1e-4, atol=1e-6)
    bf16, _ = grads(precision="bf16")
    assert torch.nn.functional.cosine_similarity(bf16, whole, dim=0) > 0.98


def test_iteration_split_adds_up_the_requests_each_worker_ran():
    """A worker runs its requests one after another: its generate seconds add up, and the split
    reports the busiest worker's (not the longest single request's)."""
    from ppg.learner.loop import busiest_worker
    from ppg.rollout.worker import RolloutResult

    def result(worker: str, generate: float, environment: float) -> RolloutResult:
        return RolloutResult(0, worker, 0, [], {"generate": generate, "environment": environment})

    results = [result("a", 0.2, 0.01), result("a", 0.3, 0.02), result("b", 0.4, 0.05)]
    assert busiest_worker(results) == pytest.approx({"generate": 0.5, "environment": 0.03})
