"""Ray Serve app exposing the policy as an OpenAI-compatible HTTP API (``ppg serve``)."""

from ppg.serve.cli import serve_main, start_server, stop_server
from ppg.serve.registry import publish_policy
from ppg.serve.settings import ServeSettings

__all__ = ["ServeSettings", "publish_policy", "serve_main", "start_server", "stop_server"]
