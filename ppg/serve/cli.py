"""What ``ppg serve --checkpoint DIR [--config FILE] [section.key=value ...]`` does.

Example::

    ppg serve --checkpoint runs/default-20261125-120000/checkpoints/iter_000060 serve.port=8001
    curl http://127.0.0.1:8001/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "ppg-policy", "messages": [{"role": "user", "content": "hi"}]}'

Set ``PPG_SERVE_API_KEY`` (``serve.api_key_env``) to require ``Authorization: Bearer <key>``. The same application can be
deployed from ``deploy/serve_config.yaml`` with ``serve run`` / ``serve deploy``.
"""

from __future__ import annotations

from pathlib import Path

import ray

from ppg import console
from ppg.config import ConfigError, PPGConfig, load_config
from ppg.learner.checkpoint import CheckpointError, validate_checkpoint
from ppg.serve.service import PolicyService


def serve_main(
    checkpoint: str, config: str | None = None, overrides: list[str] | None = None, log: Path | None = None
) -> int:
    """``ppg serve``: validate the checkpoint and config, serve until Ctrl-C. Returns an exit code.
    ``log``: where library output goes (``ppg.console``; the CLI's choice)."""
    try:
        cfg = load_config(config, overrides or [])
        validate_checkpoint(Path(checkpoint), require_trainer_state=False)
        cfg = with_checkpoint_problem(cfg, Path(checkpoint), config, overrides or [])
    except (ConfigError, CheckpointError) as e:
        console.error(f"ppg serve: {e}")
        return 2
    code = 0
    service = None
    if log is not None and (log := console.capture(log)):
        console.say(f"[ppg serve] starting Ray Serve and the policy's engine; library output: {log}")
    try:
        service = PolicyService(cfg, checkpoint, run_dir=run_of(Path(checkpoint)))
        service.wait_for_interrupt(f"{cfg.serve.model_name} from {checkpoint}")
    except Exception as e:  # a replica that cannot start (bad weights, no resources): say so, clean up
        console.error(f"ppg serve: could not start the application: {e}")
        if console.log_path():
            console.error(f"ppg serve: the full output is in {console.log_path()}")
        code = 1
    finally:
        try:
            if service is not None:
                service.close()
        finally:
            ray.shutdown()  # the local cluster this command started (no-op when joined via RAY_ADDRESS)
    return code


def run_of(checkpoint: Path) -> str | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/iter_N``), for the page's training
    view; None for a bare policy folder."""
    checkpoint = checkpoint.resolve()
    run = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and (run / "metrics.jsonl").is_file():
        return str(run)
    return None


def with_checkpoint_problem(cfg: PPGConfig, checkpoint: Path, config: str | None, overrides: list[str]):
    """The chat page offers the personas and the judge of the problem the checkpoint was trained on
    (its ``config.yaml``), unless ``--config`` or a ``problem.*`` override says otherwise."""
    saved = checkpoint / "config.yaml"
    if config or any(o.startswith("problem.") for o in overrides) or not saved.is_file():
        return cfg
    try:
        problem = load_config(saved).problem
    except ConfigError:  # an older or foreign config: the page falls back to the default problem
        return cfg
    return cfg.model_copy(update={"problem": problem})
