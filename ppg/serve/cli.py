"""What ``ppg serve --checkpoint DIR [--config FILE] [section.key=value ...]`` does.

Example::

    ppg serve --checkpoint runs/default-20261125-120000/checkpoints/iter_000060 serve.port=8001
    curl http://127.0.0.1:8001/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "ppg-policy", "messages": [{"role": "user", "content": "hi"}]}'

Set ``PPG_SERVE_API_KEY`` to require ``Authorization: Bearer <key>``. The same application can be
deployed from ``deploy/serve_config.yaml`` with ``serve run`` / ``serve deploy``.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from ppg.serve.settings import ServeSettings


def start_server(settings: ServeSettings, blocking_ready: bool = True):
    """Start (or reuse) Ray on loopback and Serve on ``settings.host:port``, deploy the policy, and
    return the ``DeploymentHandle`` (``handle.reload.remote(version, weights)``)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported
    import ray
    from ray import serve

    from ppg.serve.app import deployment

    if not ray.is_initialized():
        from ppg.driver import connect_ray

        connect_ray()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(deployment(settings), name=settings.app_name, route_prefix="/")


def stop_server(app_name: str = "ppg") -> None:
    """Delete the application and its version registry, then stop Serve."""
    from ray import serve

    from ppg.serve.registry import kill_registry

    try:
        serve.delete(app_name)
    finally:
        kill_registry(app_name)
        serve.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_main(checkpoint: str, config: str | None = None, overrides: list[str] | None = None) -> int:
    """``ppg serve``: validate the checkpoint and config, serve until Ctrl-C. Returns an exit code."""
    from ppg.config import ConfigError, load_config
    from ppg.learner.checkpoint import CheckpointError, validate_checkpoint

    try:
        cfg = load_config(config, overrides or [])
        validate_checkpoint(Path(checkpoint), require_trainer_state=False)
    except (ConfigError, CheckpointError) as e:
        print(f"ppg serve: {e}", file=sys.stderr)
        return 2
    key_file = None
    extra: dict = {}
    if os.environ.get("PPG_SERVE_API_KEY"):
        # Replicas may run where the driver's environment is not inherited (a joined cluster): hand
        # the key over in a private file, never in the deployment's config or logs.
        fd, key_file = tempfile.mkstemp(prefix="ppg-serve-key-")
        with os.fdopen(fd, "w") as f:
            f.write(os.environ["PPG_SERVE_API_KEY"])
        os.chmod(key_file, 0o600)
        extra["api_key_file"] = key_file
    settings = ServeSettings.from_config(cfg, Path(checkpoint).resolve(), **extra)
    code = 0
    try:
        start_server(settings)
        # after ray.init, which installs its own handler: `kill` / a container stop acts like Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
        url = f"http://{settings.host}:{settings.port}"
        print(f"ppg serve: {settings.model_name} from {checkpoint} at {url}/v1 (Ctrl-C to stop)")
        print(f"  try: curl {url}/healthz")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("ppg serve: stopping")
    except Exception as e:  # a replica that cannot start (bad weights, no resources): say so, clean up
        print(f"ppg serve: could not start the application: {e}", file=sys.stderr)
        code = 1
    finally:
        try:
            if key_file:
                os.unlink(key_file)  # running replicas have read it already
            stop_server(settings.app_name)
        finally:
            import ray

            ray.shutdown()  # the local cluster this command started (no-op when joined via RAY_ADDRESS)
    return code
