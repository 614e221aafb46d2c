"""Bad input and security defaults, without a cluster: every mistake is a clear error of the module's
own type (naming the file, field or tensor), never a crash with an unrelated exception; the safe
settings are the defaults.

Complements tests/test_config.py, test_personas.py, test_models.py and test_learner.py (the fixed
cases there) with property-based inputs (hypothesis) and the cases they did not cover: checkpoints
whose tensors do not fit their config, trainer state holding pickled objects, damaged newest
checkpoints, crashes between the renames of a re-save, non-UTF-8 files.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ppg.config import ConfigError, PPGConfig, load_config
from ppg.env.personas import PersonaError, load_personas
from ppg.learner.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune_checkpoints,
    save_checkpoint,
    validate_checkpoint,
)
from ppg.models import ModelPathError, resolve_model

ROOT = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=150, deadline=None, database=None, derandomize=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


# ---- checkpoints -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("embedded:tiny")


@pytest.fixture(scope="module")
def good(tmp_path_factory, model_path) -> Path:
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("good")
    model = AutoModelForCausalLM.from_pretrained(model_path)
    state = {"optimizer": torch.optim.AdamW(model.parameters()).state_dict()}
    return save_checkpoint(
        run, 1, model, model_path, state, {"iteration": 1, "policy_version": 1}, load_config()
    )


def copy_of(good: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(good, tmp_path / name))


def rewrite_weights(folder: Path, change) -> None:
    path = folder / "policy" / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_weights_that_do_not_fit_the_config_are_refused(good, tmp_path):
    wrong_shape = copy_of(good, tmp_path, "shape")
    rewrite_weights(wrong_shape, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=r"wrong shapes: \['model.norm.weight \(7,\)"):
        validate_checkpoint(wrong_shape)

    missing = copy_of(good, tmp_path, "missing")
    rewrite_weights(missing, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model.layers.0.mlp.up_proj.weight'\]"):
        validate_checkpoint(missing)

    other_config = copy_of(good, tmp_path, "config")
    config = json.loads((other_config / "policy" / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2  # the config of another model
    (other_config / "policy" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weights do not match config.json"):
        validate_checkpoint(other_config)

    garbled = copy_of(good, tmp_path, "garbled")
    (garbled / "policy" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json does not describe a causal language model"):
        validate_checkpoint(garbled)


class Smuggled:  # what a malicious trainer_state.pt would carry: an object whose unpickling runs code
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_pickled_objects_in_trainer_state_and_pickle_weights_are_refused(good, tmp_path, capsys):
    pickled = copy_of(good, tmp_path, "pickled")
    torch.save({"optimizer": Smuggled()}, pickled / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="trainer state is unreadable"):
        load_state(pickled)
    assert "this ran" not in capsys.readouterr().out

    bin_only = copy_of(good, tmp_path, "bin")
    weights = bin_only / "policy" / "model.safetensors"
    torch.save(load_file(weights), bin_only / "policy" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match="only from safetensors"):
        validate_checkpoint(bin_only)

    from ppg.serve.cli import serve_main  # ppg serve refuses it before any server starts

    assert serve_main(str(bin_only)) == 2
    assert "only from safetensors" in capsys.readouterr().err


def test_latest_checkpoint_skips_a_damaged_newest_one(good, tmp_path, caplog):
    run = tmp_path / "run"
    for i in (1, 2, 3):
        shutil.copytree(good, run / "checkpoints" / f"iter_{i:06d}")
    newest = run / "checkpoints" / "iter_000003" / "policy" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:500])  # disk trouble, a copy gone wrong
    assert latest_checkpoint(run).name == "iter_000002"
    assert "skipping damaged checkpoint" in caplog.text and "iter_000003" in caplog.text
    for name in ("iter_000001", "iter_000002"):
        (run / "checkpoints" / name / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="none of its 3 checkpoints is usable") as info:
        latest_checkpoint(run)
    assert "corrupt" in str(info.value) and "missing ['trainer_state.pt']" in str(info.value)


def test_a_crash_between_the_renames_of_a_resave_loses_nothing(good, tmp_path):
    """``save_checkpoint`` of an existing iteration renames the old folder away, then the new one in:
    a crash between the two leaves only ``.iter_N.old-PID``, which is put back."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    shutil.copytree(good, root / "iter_000001")
    shutil.copytree(good, root / ".iter_000002.old-4242")  # iter_000002 itself is gone
    shutil.copytree(good, root / ".iter_000002.tmp-4242")  # the new copy, never renamed in
    assert latest_checkpoint(run).name == "iter_000002"
    shutil.copytree(good, root / ".iter_000001.del-77")  # a prune killed mid-delete
    prune_checkpoints(run, keep_last=5)
    assert sorted(p.name for p in root.iterdir()) == ["iter_000001", "iter_000002"]
    assert [p.name for p in list_checkpoints(run)] == ["iter_000001", "iter_000002"]


# ---- configs -----------------------------------------------------------------------------------

CONFIG_KEYS = sorted(
    f"{section}.{field}"
    for section, model in PPGConfig.model_fields.items()
    for field in getattr(model.annotation, "model_fields", {})
)


@settings(PROPERTY, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.sampled_from(CONFIG_KEYS) | st.text(max_size=20),
    value=st.text(max_size=20) | json_values.map(json.dumps),
)
def test_any_override_is_a_valid_config_or_a_config_error(key, value):
    try:
        config = load_config(None, [f"{key}={value}"])
    except ConfigError as e:
        assert str(e).strip()
    else:
        assert isinstance(config, PPGConfig)


@settings(PROPERTY, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.dictionaries(st.sampled_from([*PPGConfig.model_fields, "other"]), json_values, max_size=4))
def test_any_yaml_file_is_a_valid_config_or_a_config_error_naming_the_field(tmp_path, document):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_config(path)
    except ConfigError as e:
        assert str(path) in str(e) or "invalid" in str(e)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml"):
        load_config(path)


# ---- persona files -----------------------------------------------------------------------------


def valid_record() -> dict:
    return load_personas()[0].model_dump(mode="json")


@settings(PROPERTY, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(sorted(valid_record()) + ["extra"]),
    value=json_values,
    suffix=st.sampled_from([".jsonl", ".yaml"]),
)
def test_any_persona_record_is_loaded_or_refused_naming_the_record(tmp_path, field, value, suffix):
    record = {**valid_record(), field: value}
    path = tmp_path / f"p{suffix}"
    path.write_text(json.dumps(record) + "\n" if suffix == ".jsonl" else yaml.safe_dump([record]))
    try:
        (persona,) = load_personas(path)
    except PersonaError as e:
        assert str(path) in str(e) and re.search(r"(line|item) [01]", str(e)), str(e)
    else:
        assert persona.id


@settings(PROPERTY, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=80), suffix=st.sampled_from([".jsonl", ".yaml", ".yml"]))
def test_any_bytes_as_a_persona_file_are_personas_or_a_persona_error(tmp_path, content, suffix):
    path = tmp_path / f"bytes{suffix}"
    path.write_bytes(content)
    try:
        load_personas(path)
    except PersonaError as e:
        assert str(path) in str(e)


def test_a_persona_file_that_is_not_utf8_is_a_persona_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(valid_record()).replace("p000", "caf\xe9").encode("latin-1"))
    with pytest.raises(PersonaError, match="latin1.jsonl: not UTF-8"):
        load_personas(path)


# ---- model paths -------------------------------------------------------------------------------


@settings(PROPERTY)
@given(name=st.text(max_size=30).filter(lambda s: "\x00" not in s))
def test_any_model_name_resolves_or_is_a_model_path_error(name):
    try:
        resolved = resolve_model(name if not name.startswith("embedded:") else name + "-unknown")
    except ModelPathError as e:
        assert str(e).strip()
    else:  # a hub name, returned as is (nothing is downloaded here)
        assert resolved == name and not name.startswith(("/", ".", "~"))


def test_model_folders_that_cannot_load_are_refused(tmp_path, model_path):
    folder = Path(shutil.copytree(model_path, tmp_path / "model"))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelPathError, match=r"only from\s+safetensors"):
        resolve_model(str(folder))
    with pytest.raises(ModelPathError, match="is a file"):
        resolve_model(str(folder / "config.json"))


# ---- security defaults -------------------------------------------------------------------------


def test_safe_defaults():
    from ppg.env.llm import ChatLLM
    from ppg.rollout.engine import EngineConfig
    from ppg.serve.settings import ServeSettings

    config = PPGConfig()
    assert config.model.trust_remote_code is False
    assert config.serve.host == "127.0.0.1" and config.serve.api_key_file is None
    assert EngineConfig().trust_remote_code is False
    assert ServeSettings(checkpoint="x").trust_remote_code is False
    assert inspect.signature(ChatLLM).parameters["trust_remote_code"].default is False
    for path in [ROOT / "deploy" / "serve_config.yaml"]:
        assert yaml.safe_load(path.read_text())["http_options"]["host"] == "127.0.0.1"


def calls(text: str, opening: str) -> list[str]:
    """Each ``opening...)`` call in ``text``, with nested parentheses."""
    found = []
    for match in re.finditer(re.escape(opening), text):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        found.append(text[match.start() : i])
    return found


def test_the_code_loads_no_pickles_runs_no_remote_code_and_keeps_ray_auth_on():
    """Source-level guarantees (what a review would check, enforced): every ``torch.load`` is
    ``weights_only=True``; no ``pickle.load``; ``trust_remote_code`` is never hard-wired on; nothing
    turns Ray's token authentication off; nothing binds all interfaces by default."""
    sources = {p: p.read_text() for d in ("ppg", "scripts", "benchmarks") for p in (ROOT / d).rglob("*.py")}
    sources.update({p: p.read_text() for d in ("deploy", "cluster") for p in (ROOT / d).rglob("*.y*ml")})
    problems = []
    for path, text in sources.items():
        for call in calls(text, "torch.load("):
            if "weights_only=True" not in call:
                problems.append(f"{path}: {call}")
        for pattern in (r"pickle\.loads?\(", r"trust_remote_code\s*=\s*True", r"RAY_AUTH_MODE\W+disabled"):
            problems += [f"{path}: {m}" for m in re.findall(pattern, text)]
        if path.suffix == ".py" and re.search(r"""host\s*[:=]\s*str\s*=\s*["']0\.0\.0\.0""", text):
            problems.append(f"{path}: binds 0.0.0.0 by default")
    assert not problems, problems
