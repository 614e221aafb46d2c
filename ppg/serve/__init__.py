"""Ray Serve app exposing the policy as an OpenAI-compatible HTTP API (``ppg serve``).

Importing this package does not import Ray (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` must be set before
Ray is imported, which ``start_server`` does); the names below load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ServeSettings": "ppg.serve.settings",
    "serve_main": "ppg.serve.cli",
    "start_server": "ppg.serve.cli",
    "stop_server": "ppg.serve.cli",
    "publish_policy": "ppg.serve.registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ppg.serve' has no attribute {name!r}")
