"""Where a run's metrics go besides ``metrics.jsonl`` (``run.loggers``): TensorBoard, Weights & Biases,
MLflow. Each sink takes the same two things per iteration, the numeric metrics and (every
``run.sample_every`` iterations) the sample dialogues as Markdown, so the learner never branches on
which ones are on. Only the learner's rank 0 builds them.

A restarted or resumed learner must continue the run it belongs to, not open a second one beside it:
W&B gets a run id derived from the run folder (``resume="allow"``), MLflow the run id stored in the
run folder. Resumed runs are exact, so an iteration logged twice carries the same values both times.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import time
from pathlib import Path
from typing import Protocol

from ppg.config import LOGGER_MODULES, ConfigError, flatten


class Sink(Protocol):
    def scalars(self, iteration: int, values: dict[str, float]) -> None: ...
    def text(self, iteration: int, name: str, text: str) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    """Events in ``<run_dir>/tensorboard`` (tensorboardX: writes TensorBoard's format without pulling in
    TensorFlow or the TensorBoard server); samples under the Text tab."""

    def __init__(self, run_dir: Path, config: dict) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, iteration)
        self.writer.flush()

    def text(self, iteration: int, name: str, text: str) -> None:
        self.writer.add_text(name, text, iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_run_id(run_dir: Path) -> str:
    """A W&B run id (at most 64 characters, none of ``/\\#?%:``) that names this run folder: the same
    for every restart and resume of the run, different for another folder of the same name."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', run_dir.name)[:55]}-{digest}"


class WandbSink:
    """Through Ray's ``setup_wandb`` (Ray's API-key lookup and hooks, and a disabled run on any rank
    but 0). Project ``$WANDB_PROJECT`` or ``ppg``, group ``run.name``, files in ``<run_dir>/wandb``;
    ``WANDB_MODE=offline`` needs no account (``wandb sync <run_dir>/wandb/offline-run-*`` later)."""

    def __init__(self, run_dir: Path, config: dict) -> None:
        import wandb
        from ray.air.integrations.wandb import setup_wandb

        self.wandb = wandb
        self.run = setup_wandb(
            config=config,
            project=os.environ.get("WANDB_PROJECT", "ppg"),
            group=config.get("run", {}).get("name"),
            id=wandb_run_id(run_dir),
            name=run_dir.name,
            dir=str(run_dir),
            resume="allow",
        )

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        self.run.log(values, step=iteration)

    def text(self, iteration: int, name: str, text: str) -> None:
        self.run.log({name: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=iteration)

    def close(self) -> None:
        self.run.finish()


MLFLOW_RUN = "mlflow_run.json"  # in the run folder: which MLflow run this is, for restarts and resumes


class MlflowSink:
    """MLflow's client directly: Ray's ``setup_mlflow`` starts a new MLflow run on every call, and a
    restarted or resumed learner must continue the same one. Tracking URI ``$MLFLOW_TRACKING_URI``,
    else a local store in the run folder: ``mlflow.db`` (SQLite: MLflow 3 refuses its old file store
    unless told otherwise) and ``mlartifacts/``; ``mlflow ui --backend-store-uri
    sqlite:///<run_dir>/mlflow.db`` shows it. Experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``run.name``.
    The config is logged as parameters once, when the MLflow run is created (parameters cannot
    change, and a resume may override some)."""

    def __init__(self, run_dir: Path, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_dir = run_dir.resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None if uri else (run_dir / "mlartifacts").as_uri()
        uri = uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        record = run_dir / MLFLOW_RUN
        saved = json.loads(record.read_text()) if record.is_file() else {}
        if saved.get("tracking_uri") == uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or config.get("run", {}).get("name", "ppg")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name, artifacts)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [  # MLflow keeps at most 6000 characters of a parameter (MLflow 2; 8000 in 3)
            Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000]) for k, v in flatten(config).items()
        ]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        record.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, iteration) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def text(self, iteration: int, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{name}/iter_{iteration + 1:06d}.md")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}


def open_sinks(run_dir: Path, loggers: list[str], config: dict) -> list[Sink]:
    """One sink per chosen logger. ``ppg train`` checks the packages before it starts anything; this
    check is for a learner on a cluster node whose environment lacks one."""
    sinks = []
    for name in dict.fromkeys(loggers):
        module, install = LOGGER_MODULES[name]
        try:
            sinks.append(SINKS[name](Path(run_dir), config))
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] != module:
                raise
            raise ConfigError(
                f"run.loggers: {name} needs the {module} package, which is not installed in the "
                f"learner's environment: {install}, or drop {name} from run.loggers"
            ) from None
    return sinks
