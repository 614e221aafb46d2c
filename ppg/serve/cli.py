"""What ``ppg serve --checkpoint DIR [--config FILE] [section.key=value ...]`` does.

Example::

    ppg serve --checkpoint runs/default-20261125-120000/checkpoints/iter_000060 serve.port=8001
    curl http://127.0.0.1:8001/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "ppg-policy", "messages": [{"role": "user", "content": "hi"}]}'

Set ``PPG_SERVE_API_KEY`` (``serve.api_key_env``) to require ``Authorization: Bearer <key>``. The same application can be
deployed from ``deploy/serve_config.yaml`` with ``serve run`` / ``serve deploy``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ray

from ppg.config import ConfigError, load_config
from ppg.learner.checkpoint import CheckpointError, validate_checkpoint
from ppg.serve.service import PolicyService


def serve_main(checkpoint: str, config: str | None = None, overrides: list[str] | None = None) -> int:
    """``ppg serve``: validate the checkpoint and config, serve until Ctrl-C. Returns an exit code."""
    try:
        cfg = load_config(config, overrides or [])
        validate_checkpoint(Path(checkpoint), require_trainer_state=False)
    except (ConfigError, CheckpointError) as e:
        print(f"ppg serve: {e}", file=sys.stderr)
        return 2
    code = 0
    service = None
    try:
        service = PolicyService(cfg, checkpoint)
        service.wait_for_interrupt(f"{cfg.serve.model_name} from {checkpoint}")
    except Exception as e:  # a replica that cannot start (bad weights, no resources): say so, clean up
        print(f"ppg serve: could not start the application: {e}", file=sys.stderr)
        code = 1
    finally:
        try:
            if service is not None:
                service.close()
        finally:
            ray.shutdown()  # the local cluster this command started (no-op when joined via RAY_ADDRESS)
    return code
