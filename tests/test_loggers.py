"""Watching a run: the learner's metrics and sample dialogues reach every logger of ``run.loggers``
(TensorBoard by default; W&B offline and MLflow's local store when installed, else the
clear refusal naming ``run.loggers`` and the pip command), a `ppg train` run writes them end to end,
and ``run.dashboard`` starts Ray's dashboard on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ppg.config import LOGGER_MODULES, ConfigError, check_trainable, load_config
from ppg.learner.loggers import MLFLOW_RUN, open_sinks, wandb_run_id
from ppg.learner.metrics import MetricsWriter, read_metrics

INSTALLED = {
    name: importlib.util.find_spec(module) is not None for name, (module, _) in LOGGER_MODULES.items()
}
CONFIG = load_config(None, ["run.name=watch"]).model_dump(mode="json")


def episodes(n: int = 4) -> list:
    """What write_samples reads of an episode: its persona, group, version, messages and rewards."""
    messages = [{"role": "system", "content": "You recommend."}]
    for t in range(2):
        messages += [
            {"role": "user", "content": f"idea {t}?"},
            {"role": "assistant", "content": f"jazz | {t}"},
        ]
    return [
        SimpleNamespace(
            persona_id=f"p{i}", group_id=i // 2, policy_version=1, messages=messages, rewards=[0.5, -0.5]
        )
        for i in range(n)
    ]


def write_run(run_dir: Path, loggers: list[str], iterations: range = range(2)) -> None:
    writer = MetricsWriter(run_dir, loggers, CONFIG)
    for i in iterations:
        writer.write(i, {"reward_mean": 0.1 * i, "episodes": 8, "batch_fingerprint": "abc"})
    writer.write_samples(iterations[-1], episodes())
    writer.close()


def tensorboard_events(folder: Path) -> list:
    """Every event of the TensorBoard files in ``folder`` (TFRecord framing: length, CRC, data, CRC)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[at + 12 : at + 12 + length])
            events.append(event)
            at += 12 + length + 4
    return events


def scalars_and_texts(folder: Path) -> tuple[dict, dict]:
    scalars: dict[str, list] = {}
    texts: dict[str, list] = {}
    for event in tensorboard_events(folder):
        for value in event.summary.value:
            if value.HasField("tensor") and value.tensor.string_val:
                texts.setdefault(value.tag, []).append(value.tensor.string_val[0].decode())
            elif value.HasField("simple_value") or value.tag:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, texts


def test_tensorboard_is_the_default_logger_and_bad_names_fail_with_the_field():
    assert load_config(None).run.loggers == ["tensorboard"]
    assert load_config(None, ["run.loggers=[]"]).run.loggers == []
    with pytest.raises(ConfigError, match=r"run\.loggers"):
        load_config(None, ["run.loggers=[neptune]"])


def test_tensorboard_gets_the_metrics_and_the_sample_dialogues_as_text(tmp_path):
    write_run(tmp_path, ["tensorboard"])
    scalars, texts = scalars_and_texts(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["reward_mean"]] == [0, 1]
    assert "batch_fingerprint" not in scalars, "only numbers are plotted; the JSONL keeps the rest"
    (samples,) = texts["samples/text_summary"]
    assert samples == (tmp_path / "samples" / "iter_000002.md").read_text()
    assert "| turn | user | agent | reward |" in samples and "jazz \\| 1" in samples
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1]


def test_no_loggers_writes_only_the_run_files(tmp_path):
    write_run(tmp_path, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "samples"]


def test_a_logger_that_is_not_installed_is_refused_before_anything_starts(monkeypatch, capsys):
    """`ppg train` checks run.loggers with the config (exit 2), before Ray or an engine starts."""
    from ppg.cli import main

    monkeypatch.setitem(LOGGER_MODULES, "wandb", ("ppg_no_such_tracker", "pip install 'ppg[wandb]'"))
    with pytest.raises(ConfigError) as refused:
        check_trainable(load_config(None, ["run.loggers=[tensorboard,wandb]"]))
    message = str(refused.value)
    assert "run.loggers: wandb needs the ppg_no_such_tracker package" in message
    assert "pip install 'ppg[wandb]'" in message and "tensorboard" not in message.split("run.loggers")[1]
    assert main(["train", "run.loggers=[wandb]", "run.output_dir=/nonexistent/never-created"]) == 2
    assert "pip install 'ppg[wandb]'" in capsys.readouterr().err
    assert not Path("/nonexistent/never-created").exists()


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_missing_tracker_package_names_run_loggers_and_the_extra(name, tmp_path):
    """Here the package really is absent (the offline tests below run where it is installed)."""
    if INSTALLED[name]:
        pytest.skip(f"{name} is installed: its offline test runs instead")
    with pytest.raises(ConfigError, match=rf"run\.loggers: {name} needs .*pip install 'ppg\[{name}\]'"):
        check_trainable(load_config(None, [f"run.loggers=[{name}]"]))
    with pytest.raises(ConfigError, match=rf"run\.loggers: {name} .* learner's environment"):
        open_sinks(tmp_path, [name], CONFIG)  # a cluster node without it


@pytest.mark.skipif(not INSTALLED["wandb"], reason="wandb not installed (pip install 'ppg[wandb]')")
def test_wandb_offline_run_in_the_run_folder_continues_on_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "watch-20261201-000000"
    run_dir.mkdir()
    write_run(run_dir, ["wandb"])
    write_run(run_dir, ["wandb"], range(2, 3))  # a restarted learner: same W&B run id
    run_id = wandb_run_id(run_dir)
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(list(d.glob(f"run-{run_id}.wandb")) for d in offline)


@pytest.mark.skipif(not INSTALLED["mlflow"], reason="mlflow not installed (pip install 'ppg[mlflow]')")
def test_mlflow_local_store_in_the_run_folder_continues_on_restart(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    write_run(tmp_path, ["mlflow"])
    write_run(tmp_path, ["mlflow"], range(2, 3))  # a restarted learner: the same MLflow run
    record = json.loads((tmp_path / MLFLOW_RUN).read_text())
    assert record["tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.data.params["run.name"] == "watch" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward_mean")] == [0, 1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/iter_000002.md", "samples/iter_000003.md"}


@pytest.mark.slow
def test_ppg_train_writes_metrics_and_samples_to_its_loggers(ray_cluster, tmp_path):
    """One real iteration: the learner (a Ray Train worker) writes the scalars and the sample
    dialogues to TensorBoard (and MLflow's local store, when installed), next to the run files."""
    from ppg.driver import train

    loggers = ["tensorboard"] + (["mlflow"] if INSTALLED["mlflow"] else [])
    overrides = [
        f"run.output_dir={tmp_path}",
        "run.name=watch",
        "run.iterations=1",
        "run.sample_every=1",
        "run.final_eval_episodes=0",
        f"run.loggers=[{','.join(loggers)}]",
        "rollout.num_workers=1",
        "rollout.episodes_per_iteration=4",
        "rollout.group_size=2",
        "rollout.max_tokens_per_turn=8",
    ]
    run = train(load_config(None, overrides), run_dir=tmp_path / "watch")
    scalars, texts = scalars_and_texts(run / "tensorboard")
    assert [step for step, _ in scalars["reward_mean"]] == [0] and "episodes_per_s" in scalars
    assert texts["samples/text_summary"] == [(run / "samples" / "iter_000001.md").read_text()]
    if INSTALLED["mlflow"]:
        assert (run / MLFLOW_RUN).is_file() and (run / "mlflow.db").is_file()


@pytest.mark.slow
def test_run_dashboard_serves_rays_dashboard_on_loopback(tmp_path):
    """run.dashboard=true: connect() starts the dashboard on 127.0.0.1 and prints its URL (its own
    process: the test session's Ray runs without one)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    code = (
        "import io, contextlib, urllib.request, ray\n"
        "from ppg.ray_session import connect\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    connect(num_cpus=1, dashboard=True)\n"
        "line = [s for s in out.getvalue().splitlines() if s.startswith('[ppg] Ray dashboard: ')][0]\n"
        "url = line.split(': ', 1)[1]\n"
        "with urllib.request.urlopen(url + '/', timeout=30) as r:\n"
        "    print(line, r.status)\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [s for s in done.stdout.splitlines() if s.startswith("[ppg] Ray dashboard: ")]
    assert line.startswith("[ppg] Ray dashboard: http://127.0.0.1:") and line.endswith(" 200")
