"""A running ``ppg serve`` application: start it, reload it, stop it (``ppg serve``, ``ppg train
serve.enabled=true``, benchmarks and tests all start the server through here)."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

from ray import serve

from ppg import console
from ppg.config import PPGConfig
from ppg.policy_registry import kill_registry
from ppg.ray_session import connect
from ppg.serve.app import deployment
from ppg.serve.settings import ServeSettings


def start_server(settings: ServeSettings):
    """Start (or reuse) Ray on loopback and Serve on ``settings.host:port``, deploy the policy, and
    return the ``DeploymentHandle`` (``handle.reload.remote(version, weights)``). Returns once a
    replica answers and has joined the version registry, so a ``publish_policy`` right after is
    not lost."""
    connect(serve_ingress=settings.ingress)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    handle = serve.run(deployment(settings), name=settings.app_name, route_prefix="/")
    handle.policy_version.remote().result()
    return handle


def stop_server(app_name: str = "ppg") -> None:
    """Delete the application and its version registry; stop Serve too unless other apps still run
    on it (a shared cluster's own applications are left alone)."""
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
        console.say(f"ppg: serving {what} (Ctrl-C to stop)")
        console.say(f"  chat with it:  {self.url}/")
        if self.settings.run_dir:
            console.say(f"  its training:  {self.url}/live")
        console.say(f"  OpenAI API:    {self.url}/v1   (try: curl {self.url}/healthz)")
        if self.settings.api_key():
            console.say(f"  the page and the API ask for the key in ${self.settings.api_key_env}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.say("ppg: stopping the server")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
