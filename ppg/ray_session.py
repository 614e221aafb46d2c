"""How a ppg process joins Ray, and the names by which its processes find each other's actors.

Named actors are the system's meeting points: the learner, ``cluster/scale_rollout.py`` and the
experiment runner find the rollout pool by name; rollout workers find the shared LLM partner/judge
by name. Keeping the names here lets any module use them without importing the modules that start
those actors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray

POOL_ACTOR = "ppg-rollout-pool"  # the RolloutPool (ppg/rollout/pool.py)
CHAT_LLM_ACTOR = "ppg-chat-llm"  # the shared LLM partner/judge, when the config asks for one


def connect(num_cpus: int | None = None, dashboard: bool = False, serve_ingress: str = "haproxy") -> None:
    """Join the cluster named by RAY_ADDRESS, else start a local one that listens on 127.0.0.1 only.

    ``dashboard`` (``run.dashboard``): the local cluster also starts the Ray dashboard, bound to
    127.0.0.1 like everything else, and its URL is printed. Off by default: it costs a few processes
    and seconds that tests and short runs do not need. A joined cluster keeps its own dashboard.
    ``serve_ingress`` (``serve.ingress``): how a local cluster's Serve takes HTTP; Ray reads it from
    the environment its processes start with, so it is decided here (``ppg/serve/ingress.py``)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    from ppg.serve.ingress import prepare_local_cluster

    ingress = prepare_local_cluster(serve_ingress)
    if ingress != serve_ingress:
        print(f"[ppg] serve.ingress={serve_ingress} unavailable: serving through {ingress}", flush=True)
    # address="local": always a new cluster, never one a `ray start` left on this machine
    context = ray.init(
        address="local",
        num_cpus=num_cpus or max(4, os.cpu_count() or 1),
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
    )
    if dashboard and context.dashboard_url:
        print(f"[ppg] Ray dashboard: http://{context.dashboard_url}", flush=True)


def shareable_weights(weights: Mapping[str, Any] | str | Path) -> str | ray.ObjectRef:
    """Weights in the form that crosses processes cheaply: a checkpoint folder as its path (each
    reader loads it), a state dict put into the object store once (every worker reads the same
    object; an ObjectRef also survives the caller that sent it)."""
    from ppg.weights import SharedWeights

    if isinstance(weights, SharedWeights):  # in the object store already: the same object, no copy
        return weights.ref
    return str(weights) if isinstance(weights, (str, Path)) else ray.put(dict(weights))
