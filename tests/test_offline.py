"""Offline PPG: the logged-conversation file (round trip, bad files named by line and field), the
offline collector's batches (whole groups, deterministic per (seed, iteration) in any call order),
the exact reward-weighted log-likelihood gradient of one offline update, and `ppg collect` then
`ppg train run.offline_data=FILE` end to end on a real local Ray cluster."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import scripted_episodes

from ppg.config import ConfigError, load_config
from ppg.episode import Episode
from ppg.learner.loop import OfflineCollector, batch_fingerprint, update
from ppg.learner.update import PolicyLearner, global_advantages
from ppg.offline import (
    EpisodeFileError,
    check_offline_data,
    episode_groups,
    read_episodes,
    read_header,
    write_episodes,
)

HEADER = {"problem": "myopic", "model": "embedded:tiny", "policy": "initial (embedded:tiny)"}


def toy_episode(group: int, member: int, turns: int = 2, problem: str = "myopic") -> Episode:
    """A hand-made episode over a 32-token vocabulary: 3 context tokens, then per turn 2 user
    (context) and 2 agent tokens; rewards differ by group, member and turn."""
    ids, mask, turn_of = [1, 2, 3], [False] * 3, [0] * 3
    messages = [{"role": "system", "content": "be helpful"}]
    for t in range(turns):
        ids += [4 + t, 5 + t, 10 + (group * 7 + member * 3 + t) % 20, 31]
        mask += [False, False, True, True]
        turn_of += [t] * 4
        messages += [{"role": "user", "content": f"u{t}"}, {"role": "assistant", "content": f"a{t}"}]
    rewards = [round(0.1 * (group + 1) - 0.3 * member + 0.2 * t * (-1) ** group, 3) for t in range(turns)]
    return Episode(problem, f"p{group}", group, 0, messages, rewards, [0] * turns, ids, mask, turn_of)


def toy_file(path: Path, groups: int = 8, size: int = 2) -> Path:
    episodes = [toy_episode(g, m) for g in range(groups) for m in range(size)]
    return write_episodes(path, episodes, HEADER)


def offline_config(path: Path, *overrides: str):
    base = [
        f"run.offline_data={path}",
        "rollout.group_size=2",
        "rollout.episodes_per_iteration=4",
        "problem.name=myopic",
    ]
    return check_offline_data(load_config(None, base + list(overrides)))


# --- the file ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_episodes():
    return scripted_episodes("myopic", num_personas=3)  # real tokens, messages and judged rewards


def test_round_trip_keeps_every_field_but_logprobs(tmp_path, real_episodes):
    logged = [copy.copy(e) for e in real_episodes]
    logged[0].logprobs = [0.0] * len(logged[0].token_ids)  # the sampler's, not stored
    path = write_episodes(tmp_path / "e.jsonl", logged, {**HEADER, "seed": 7})
    header, episodes = read_episodes(path)
    assert episodes == real_episodes and all(e.logprobs is None for e in episodes)
    assert header.episodes == len(real_episodes) and header.problem == "myopic"
    assert header.model_extra == {"seed": 7} and read_header(path) == header
    assert not list(tmp_path.glob(".e.jsonl.*")), "written through a renamed temporary file"
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["format"] == "ppg-episodes" and len(lines) == 1 + len(real_episodes)


def rewrite(path: Path, line: int, edit) -> Path:
    """Apply ``edit`` to the JSON of 1-based ``line`` of the file."""
    lines = path.read_text().splitlines()
    data = json.loads(lines[line - 1])
    edit(data)
    lines[line - 1] = json.dumps(data)
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_LINES = [
    (
        3,
        lambda d: d["rewards"].__setitem__(0, "x"),
        r"line 3: field 'rewards\.0': Input should be a valid number",
    ),
    (2, lambda d: d["agent_mask"].pop(), r"line 2: field 'agent_mask' has 10 entries but token_ids has 11"),
    (4, lambda d: d["segment_ids"].append(0), r"line 4: field 'segment_ids' has 3 entries but rewards has 2"),
    (
        2,
        lambda d: d["token_turn"].__setitem__(9, 5),
        r"line 2: field 'token_turn' on agent tokens names turn 5",
    ),
    (
        5,
        lambda d: d.__setitem__("group_id", "1"),
        r"line 5: field 'group_id': Input should be a valid integer",
    ),
    (
        2,
        lambda d: d["agent_mask"].__setitem__(0, 1),
        r"line 2: field 'agent_mask\.0': Input should be a valid boolean",
    ),
    (3, lambda d: d.pop("token_ids"), r"line 3: field 'token_ids': Field required"),
    (3, lambda d: d.__setitem__("logprobs", []), r"line 3: field 'logprobs': unknown field"),
    (2, lambda d: d.__setitem__("problem", "other"), r"line 2: field 'problem' is 'other'"),
    (1, lambda d: d.__setitem__("format", "csv"), r"line 1 \(header\): field 'format' is 'csv'"),
    (1, lambda d: d.__setitem__("version", 2), r"line 1 \(header\): field 'version' is 2"),
    (1, lambda d: d.pop("model"), r"line 1 \(header\): field 'model': Field required"),
    (1, lambda d: d.__setitem__("episodes", 3), r"'episodes': 3, but 4 episode lines follow"),
]


@pytest.mark.parametrize(("line", "edit", "message"), BAD_LINES)
def test_bad_files_name_the_line_and_the_field(tmp_path, line, edit, message):
    path = rewrite(toy_file(tmp_path / "e.jsonl", groups=2), line, edit)
    with pytest.raises(EpisodeFileError, match=message) as error:
        read_episodes(path)
    assert str(path) in str(error.value) and "ppg collect" in str(error.value), "names the file and the fix"


def test_truncated_missing_and_empty_files(tmp_path):
    path = toy_file(tmp_path / "e.jsonl", groups=2)
    path.write_text(path.read_text()[:-40])  # a copy cut short
    with pytest.raises(EpisodeFileError, match=r"line 5 is not valid JSON .*truncated"):
        read_episodes(path)
    with pytest.raises(EpisodeFileError, match=r"does not exist; write it with ppg collect"):
        read_episodes(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(EpisodeFileError, match=r"line 1 \(header\) is empty"):
        read_episodes(tmp_path / "empty.jsonl")


def test_writing_refuses_what_reading_would(tmp_path):
    bad = toy_episode(0, 0)
    bad.token_turn = bad.token_turn[:-1]
    with pytest.raises(EpisodeFileError, match=r"episode 1: field 'token_turn' has 10 entries"):
        write_episodes(tmp_path / "e.jsonl", [toy_episode(0, 1), bad], HEADER)
    with pytest.raises(EpisodeFileError, match=r"header: field 'policy': Field required"):
        write_episodes(tmp_path / "e.jsonl", [toy_episode(0, 1)], {"problem": "myopic", "model": "m"})
    with pytest.raises(EpisodeFileError, match=r"episode 0: field 'problem' is 'segmented'"):
        write_episodes(tmp_path / "e.jsonl", [toy_episode(0, 0, problem="segmented")], HEADER)
    assert not (tmp_path / "e.jsonl").exists()


def test_offline_data_is_checked_against_the_config(tmp_path):
    path = toy_file(tmp_path / "e.jsonl", groups=3)
    config = offline_config(path)
    assert config.run.offline_data == path.resolve()
    cases = [
        (["problem.name=segmented"], "set problem.name=myopic, or collect segmented episodes"),
        (["model.name_or_path=other"], r"set model.name_or_path=embedded:tiny"),
        (["rollout.group_size=4", "rollout.episodes_per_iteration=4"], r"groups have \{2: 3\}"),
        (
            ["rollout.episodes_per_iteration=8"],
            "holds 6 episodes, fewer than rollout.episodes_per_iteration=8",
        ),
        ([f"run.offline_data={tmp_path / 'nope.jsonl'}"], "does not exist; write it with ppg collect"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match="run.offline_data=") as error:
            offline_config(path, *overrides)
        assert re.search(message, str(error.value)), str(error.value)


def test_cli_refuses_before_anything_starts(tmp_path, capsys):
    from ppg.cli import main

    assert main(["train", f"run.offline_data={tmp_path / 'nope.jsonl'}"]) == 2
    assert "run.offline_data=" in capsys.readouterr().err
    assert main(["collect", "--out", str(tmp_path / "e.jsonl"), "--episodes", "6"]) == 2
    assert "multiple of rollout.group_size (4)" in capsys.readouterr().err


# --- offline batches -----------------------------------------------------------------------------------


def test_batches_are_whole_groups_and_depend_only_on_seed_and_iteration(tmp_path):
    path = toy_file(tmp_path / "e.jsonl", groups=7)  # 3 batches of 2 groups per epoch, 1 group left out
    config = offline_config(path)
    _, logged = read_episodes(path)
    source = {tuple(e.token_ids): g for g, group in enumerate(episode_groups(logged)) for e in group}

    in_order = OfflineCollector(config)
    batches = [in_order.collect(i, version=i + 1) for i in range(7)]
    for i, batch in enumerate(batches):
        assert len(batch.episodes) == 4 and batch.dropped == 0
        assert [e.group_id for e in batch.episodes] == [0, 0, 1, 1], "renumbered per batch"
        assert all(e.policy_version == i + 1 and e.logprobs is None for e in batch.episodes)
        origin = [source[tuple(e.token_ids)] for e in batch.episodes]
        assert origin[0] == origin[1] != origin[2] == origin[3], "whole groups of the file"
        # run.offline_weighting=positive (the default): the advantages clipped at 0
        torch.testing.assert_close(
            batch.advantages, global_advantages(batch.episodes, config.objective).clamp(min=0)
        )
    epochs = [{source[tuple(e.token_ids)] for b in batches[k : k + 3] for e in b.episodes} for k in (0, 3)]
    assert all(len(groups) == 6 for groups in epochs), "an epoch's batches never repeat a group"
    assert epochs[0] != epochs[1] or batches[0].fingerprint != batches[3].fingerprint, (
        "a new epoch reshuffles"
    )

    for i in (6, 2, 0, 5):  # a fresh collector (a resumed learner), any order: the same batches
        again = OfflineCollector(config).collect(i, version=i + 1)
        assert again.episodes == batches[i].episodes and again.fingerprint == batches[i].fingerprint
    other = OfflineCollector(offline_config(path, "run.seed=1"))
    assert [other.collect(i, 1).fingerprint for i in range(3)] != [b.fingerprint for b in batches[:3]]


def test_collect_plan_does_not_depend_on_the_pool_size():
    from ppg.collect import collect_requests

    one = collect_requests(load_config(None, ["rollout.num_workers=1"]), 96, seed=3)
    four = collect_requests(load_config(None, ["rollout.num_workers=4"]), 96, seed=3)
    assert one == four and len(one) == 3 and sum(len(r.seeds) for r in one) == 96
    assert all(r.split == "train" for r in one)
    with pytest.raises(ValueError, match="multiple of rollout.group_size"):
        collect_requests(load_config(), 10, seed=0)


# --- the exact update ----------------------------------------------------------------------------------


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    spec = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(spec).float()


def hand_advantages(episodes: list[Episode]) -> list[list[float]]:
    """Full planning (G[t] = sum of rewards from t on) minus the mean G[t] of the *other* episodes of
    the group (group_mean, leave-one-out), in plain Python."""
    returns = [[sum(e.rewards[t:]) for t in range(e.num_turns)] for e in episodes]
    out = []
    for b, e in enumerate(episodes):
        others = [c for c, o in enumerate(episodes) if o.group_id == e.group_id and c != b]
        out.append(
            [returns[b][t] - sum(returns[c][t] for c in others) / len(others) for t in range(e.num_turns)]
        )
    return out


@pytest.mark.parametrize(
    "reduction,weighting",
    [("sequence_mean", "advantage"), ("token_mean", "advantage"), ("sequence_mean", "positive")],
)
def test_one_offline_update_is_the_reward_weighted_log_likelihood_gradient(tmp_path, reduction, weighting):
    """grad = -(1/N) sum_episodes sum_turns w[t] * grad log pi(a_t|s_t), computed one episode at a time
    with per-token autograd, equals the learner's batched offline update (no importance weight); w is
    the advantage, or the advantage clipped at 0 (run.offline_weighting)."""
    config = offline_config(
        toy_file(tmp_path / "e.jsonl", groups=4),
        "objective.policy_class.type=full",
        "objective.baseline.type=group_mean",
        f"learner.loss_reduction={reduction}",
        f"run.offline_weighting={weighting}",
    )
    batch = OfflineCollector(config).collect(iteration=1, version=3)
    expected = hand_advantages(batch.episodes)
    if weighting == "positive":
        assert any(a < 0 for row in expected for a in row), "the toy batch must have turns to clip"
        expected = [[max(a, 0.0) for a in row] for row in expected]
    torch.testing.assert_close(batch.advantages, torch.tensor(expected))

    direct_model = tiny_model()
    settings = config.learner.model_copy(update={"grad_clip": 1e9})  # the raw gradient, unclipped
    learner = PolicyLearner(copy.deepcopy(direct_model), config.objective, settings, 1)
    stats = update(learner, batch, rank=0, world=1, version=3)
    assert stats.importance_weight == 1.0

    tokens = sum(sum(e.agent_mask) for e in batch.episodes)
    norm = len(batch.episodes) if reduction == "sequence_mean" else tokens
    objective = torch.zeros(())
    for e, adv in zip(batch.episodes, expected, strict=True):
        logp = torch.log_softmax(direct_model(input_ids=torch.tensor([e.token_ids])).logits[0], -1)
        for i, (own, t) in enumerate(zip(e.agent_mask, e.token_turn, strict=True)):
            if own:  # log pi of the agent's token i, predicted from the tokens before it
                objective = objective + adv[t] * logp[i - 1, e.token_ids[i]]
    (-objective / norm).backward()
    for (name, mine), theirs in zip(learner.model.named_parameters(), direct_model.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7, msg=name)


# --- end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_collect_then_train_offline_end_to_end(ray_cluster, tmp_path, capsys):
    from safetensors.torch import load_file

    from ppg.cli import main
    from ppg.driver import train
    from ppg.learner.checkpoint import latest_checkpoint, validate_checkpoint
    from ppg.learner.metrics import read_metrics
    from ppg.models import resolve_model

    tiny = ["problem.name=myopic", "rollout.group_size=4", "rollout.max_tokens_per_turn=12"]
    out = tmp_path / "myopic.jsonl"
    assert main(["collect", "--out", str(out), "--episodes", "16", *tiny]) == 0
    printed = capsys.readouterr().out
    assert "[ppg collect] 16/16 episodes" in printed and "episodes/s" in printed
    assert f"ppg train problem.name=myopic run.offline_data={out}" in printed
    header, logged = read_episodes(out)
    assert (header.problem, header.model, header.episodes, header.model_extra["group_size"]) == (
        "myopic",
        "embedded:tiny",
        16,
        4,
    )
    assert [len(g) for g in episode_groups(logged)] == [4] * 4 and all(e.policy_version == 0 for e in logged)
    assert all(len(e.rewards) == 4 for e in logged), "judged per turn, as in training"

    config = load_config(
        None,
        tiny
        + [
            "rollout.episodes_per_iteration=8",
            "run.iterations=2",
            "run.checkpoint_every=1",
            "run.final_eval_episodes=0",
            f"run.output_dir={tmp_path}",
            "run.name=offline",
            f"run.offline_data={out}",
        ],
    )
    run = train(config, run_dir=tmp_path / "offline")
    rows = read_metrics(run)
    assert [r["policy_version"] for r in rows] == [1, 2] and all(r["episodes"] == 8 for r in rows)
    assert all(r["importance_weight"] == 1.0 and r["weights_acked_by"] == 1 for r in rows)
    saved = load_config(run / "config.yaml")
    assert saved.run.offline_data == out.resolve()
    offline = OfflineCollector(saved)
    assert [r["batch_fingerprint"] for r in rows] == [
        batch_fingerprint(offline.collect(i, i).episodes) for i in range(2)
    ], "the learner trained on the file's batches"
    final = latest_checkpoint(run)
    assert final.name == "iter_000002"
    validate_checkpoint(final)
    trained = load_file(final / "policy" / "model.safetensors")
    initial = load_file(Path(resolve_model("embedded:tiny")) / "model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in initial), "the update moved the policy"
