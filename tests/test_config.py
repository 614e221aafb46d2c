"""The config tree: YAML + overrides -> validated models; every bad value named by its path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ppg.cli import main
from ppg.config import ConfigError, PPGConfig, apply_override, check_trainable, load_config
from ppg.objectives import GroupMean, KStep

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = load_config()
    assert cfg.model.name_or_path == "embedded:tiny"
    assert cfg.serve.host == "127.0.0.1"
    assert cfg.model.trust_remote_code is False
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "objective": {"policy_class": {"type": "k_step", "k": 3}, "gamma": 0.9},
                "rollout": {"num_workers": 2},
            }
        )
    )
    cfg = load_config(
        path, ["objective.policy_class.k=2", "rollout.num_workers=4", "objective.baseline.type=group_mean"]
    )
    assert cfg.objective.policy_class == KStep(k=2)
    assert cfg.objective.gamma == 0.9
    assert cfg.objective.baseline == GroupMean()
    assert cfg.rollout.num_workers == 4


def test_switching_variant_type_starts_that_subtree_afresh(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective: {policy_class: {type: k_step, k: 3}}\n")
    assert load_config(path, ["objective.policy_class.type=greedy"]).objective.policy_class.type == "greedy"
    cfg = load_config(
        path, ["objective.policy_class.type=custom", "objective.policy_class.matrix=[[1,1],[0,1]]"]
    )
    assert cfg.objective.policy_class.matrix == [[1, 1], [0, 1]]


def test_override_values_are_typed_yaml_scalars():
    raw = apply_override({}, "run.output_dir=/tmp/x")
    raw = apply_override(raw, "serve.enabled=true")
    raw = apply_override(raw, "problem.segment_boundaries=[2, 4]")
    raw = apply_override(raw, "problem.num_turns=6")
    cfg = PPGConfig.model_validate(raw)
    assert cfg.serve.enabled is True and cfg.problem.segment_boundaries == [2, 4]
    assert str(cfg.run.output_dir) == "/tmp/x"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["objective.policy_class.type=k_step", "objective.policy_class.k=-1"],
            ["objective.policy_class.k: Input should be greater than 0 (got -1)"],
        ),
        (["objective.policy_class.type=k_step"], ["objective.policy_class.k: Field required"]),
        (
            ["objective.policy_class.type=planning"],
            ["objective.policy_class:", "'full', 'greedy', 'k_step', 'segment', 'custom'"],
        ),
        (["objective.gamma=1.5"], ["objective.gamma: Input should be less than or equal to 1 (got 1.5)"]),
        (["objective.gamma=0"], ["objective.gamma: Input should be greater than 0"]),
        (["learner.loss_reduction=mean"], ["learner.loss_reduction:", "'sequence_mean' or 'token_mean'"]),
        (["model.dtype=fp8"], ["model.dtype:", "'float32', 'bfloat16' or 'float16'"]),
        (["rollout.num_workers=0"], ["rollout.num_workers: Input should be greater than 0"]),
        (["rollout.group_size=3"], ["must be a multiple of group_size (3)"]),
        (["serve.port=70000"], ["serve.port: Input should be less than or equal to 65535"]),
        (
            ["problem.num_turns=4", "problem.segment_boundaries=[0, 2]"],
            ["segment_boundaries [0, 2] must lie in 1..3"],
        ),
        (["problem.segment_boundaries=[3, 2]"], ["must be strictly increasing"]),
        (["learner.lrr=0.1"], ["learner.lrr: unknown key"]),
        (
            ["objective.policy_class.type=greedy", "objective.policy_class.k=2"],
            ["objective.policy_class.k: unknown key"],
        ),
        (["bogus.x=1"], ["bogus: unknown key"]),
        (["run.iterations=many"], ["run.iterations: Input should be a valid integer", "'many'"]),
    ],
)
def test_invalid_values_name_the_field_path_and_the_allowed_values(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for text in expected:
        assert text in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("objective: [1, 2\n", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping of sections"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == PPGConfig()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override", ["gamma", "=1", "objective..gamma=1", "objective.gamma=[1"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError, match="override"):
        load_config(None, [override])


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="objective.gamma is a value, not a section"):
        load_config(None, ["objective.gamma=0.5", "objective.gamma.x=1"])


def test_examples_are_valid():
    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert examples, "examples/ should hold at least one config"
    for path in examples:
        load_config(path)


# --- The console script ------------------------------------------------------------------------


def run_ppg(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ppg")
    return subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_ppg_config_show_prints_the_resolved_yaml():
    result = run_ppg(
        "config", "show", "--config", str(REPO / "examples" / "greedy.yaml"), "objective.gamma=0.5"
    )
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["objective"]["gamma"] == 0.5
    assert shown["objective"]["policy_class"] == {"type": "greedy"}
    assert PPGConfig.model_validate(shown).objective.gamma == 0.5


def test_ppg_bad_config_exits_2_with_the_field_named(capsys):
    assert main(["config", "show", "objective.policy_class.type=k_step", "objective.policy_class.k=0"]) == 2
    err = capsys.readouterr().err
    assert "objective.policy_class.k" in err and "greater than 0" in err


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["run.async_rollouts=true", "learner.max_staleness=0"], "learner.max_staleness=0"),
        (["run.async_rollouts=true", "learner.max_staleness=1", "learner.off_policy=reject"], "reject"),
        (["rollout.temperature=0.7"], "rollout.temperature=0.7"),
        (["rollout.top_p=0.9"], "rollout.top_p=0.9"),
        (
            ["learner.algorithm=ppo", "run.async_rollouts=true", "learner.max_staleness=1"],
            "learner.algorithm=ppo",
        ),
    ],
)
def test_combinations_that_cannot_train_are_refused_before_anything_starts(
    tmp_path, capsys, overrides, named
):
    with pytest.raises(ConfigError, match="cannot train") as e:
        check_trainable(load_config(None, overrides))
    assert named in str(e.value)
    out = tmp_path / "runs"
    assert main(["train", *overrides, f"run.output_dir={out}"]) == 2
    assert named in capsys.readouterr().err and not out.exists(), "no run folder for a refused config"
    ok = ["run.async_rollouts=true", "learner.max_staleness=1", "learner.off_policy=importance"]
    check_trainable(load_config(None, ok))  # the supported asynchronous setting passes


def test_rollouts_overlap_the_update_by_default_wherever_the_learner_accepts_it():
    """run.async_rollouts unset: on for the shipped default (one version of staleness, importance-
    weighted, one step per batch); off, never an error, where the learner could not use the batch."""
    assert load_config(None, []).overlaps_rollouts
    for off in (
        ["learner.max_staleness=0"],
        ["learner.off_policy=reject"],
        ["learner.algorithm=ppo"],
        ["run.async_rollouts=false"],
    ):
        config = check_trainable(load_config(None, off))
        assert not config.overlaps_rollouts, off
    assert load_config(None, ["learner.max_staleness=0", "run.async_rollouts=true"]).overlaps_rollouts


def test_date_like_values_stay_strings(tmp_path):
    assert load_config(None, ["run.name=2024-01-01"]).run.name == "2024-01-01"
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: 2024-01-01\n")
    assert load_config(path).run.name == "2024-01-01"
    assert load_config(None, ["run.seed=7"]).run.seed == 7  # other scalars keep their types


def test_ppg_help_shows_an_example():
    result = run_ppg("config", "show", "--help")
    assert result.returncode == 0
    assert "ppg config show --config" in result.stdout


def test_one_gpu_can_hold_the_learner_and_a_rollout_worker():
    from ppg.driver import learner_scaling

    config = load_config(
        None, ["learner.use_gpu=true", "learner.gpus_per_worker=0.5", "rollout.gpus_per_worker=0.5"]
    )
    scaling = learner_scaling(config)
    assert scaling.use_gpu and scaling.resources_per_worker["GPU"] == 0.5
    assert "GPU" not in learner_scaling(load_config()).resources_per_worker  # CPU learner asks for none
