"""What ``ppg serve --checkpoint DIR [--config FILE] [section.key=value ...]`` does.

Example::

    ppg serve --checkpoint runs/default-20261125-120000/checkpoints/iter_000060 serve.port=8001
    curl http://127.0.0.1:8001/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "ppg-policy", "messages": [{"role": "user", "content": "hi"}]}'

Set ``PPG_SERVE_API_KEY`` (``serve.api_key_env``) to require ``Authorization: Bearer <key>``. The same application can be
deployed from ``deploy/serve_config.yaml`` with ``serve run`` / ``serve deploy``.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from ppg.config import PPGConfig
from ppg.serve.settings import ServeSettings


def start_server(settings: ServeSettings):
    """Start (or reuse) Ray on loopback and Serve on ``settings.host:port``, deploy the policy, and
    return the ``DeploymentHandle`` (``handle.reload.remote(version, weights)``). Returns once a
    replica answers and has joined the version registry, so a ``publish_policy`` right after is
    not lost."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported
    import ray
    from ray import serve

    from ppg.serve.app import deployment

    if not ray.is_initialized():
        from ppg.driver import connect_ray

        connect_ray()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    handle = serve.run(deployment(settings), name=settings.app_name, route_prefix="/")
    handle.policy_version.remote().result()
    return handle


def stop_server(app_name: str = "ppg") -> None:
    """Delete the application and its version registry; stop Serve too unless other apps still run
    on it (a shared cluster's own applications are left alone)."""
    from ray import serve

    from ppg.serve.registry import kill_registry

    try:
        serve.delete(app_name)
    finally:
        kill_registry(app_name)
        if not serve.status().applications:
            serve.shutdown()


class PolicyService:
    """A started ``ppg serve`` application for a config and a checkpoint; ``close()`` stops it.

    The bearer token (``serve.api_key_env``) reaches replicas in a private file, never in the
    deployment's config or logs: replicas may run where the driver's environment is not inherited
    (a joined cluster). The file is removed on close.
    """

    def __init__(self, config: PPGConfig, checkpoint: str | Path, **extra) -> None:
        self._key_file, self._started = None, False
        token = os.environ.get(config.serve.api_key_env, "").strip()
        if token and "api_key_file" not in extra:
            fd, self._key_file = tempfile.mkstemp(prefix="ppg-serve-key-")
            with os.fdopen(fd, "w") as f:
                f.write(token)
            os.chmod(self._key_file, 0o600)
            extra["api_key_file"] = self._key_file
        try:
            self.settings = ServeSettings.from_config(config, Path(checkpoint).resolve(), **extra)
            self.url = f"http://{self.settings.host}:{self.settings.port}"
            self._started = True  # from here on, close() has a (maybe half-started) app to remove
            self.handle = start_server(self.settings)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            if self._key_file:
                os.unlink(self._key_file)  # running replicas have read it already
                self._key_file = None
        finally:
            if self._started:
                self._started = False
                stop_server(self.settings.app_name)

    def wait_for_interrupt(self, what: str) -> None:
        """Block until Ctrl-C or SIGTERM (``kill`` / a container stop acts like Ctrl-C)."""
        signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own handler
        print(f"ppg: serving {what} at {self.url}/v1 (Ctrl-C to stop)", flush=True)
        print(f"  try: curl {self.url}/healthz", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("ppg: stopping the server", flush=True)


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
            import ray

            ray.shutdown()  # the local cluster this command started (no-op when joined via RAY_ADDRESS)
    return code
