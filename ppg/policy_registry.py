"""The policy-version registry: how a weight reload reaches every Serve replica.

A ``DeploymentHandle`` routes each call to *one* replica, so ``handle.reload.remote(v, w)`` cannot by
itself update them all. Instead there is one small named actor per application, holding the newest
``(version, weights)``; the replica that receives ``reload`` applies it and publishes it here, and
every replica polls ``newer_than(own version)`` every ``reload_poll_s`` and reloads itself. Replicas
that start later (autoscaling, restarts) catch up the same way before serving. The learner can skip
the handle and call ``publish_policy`` directly.

Weights are a checkpoint folder path (cheap: each replica reads the folder) or a state dict, which
the registry ``ray.put``s itself so the object outlives the caller that sent it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import ray

from ppg.ray_session import shareable_weights

NAMESPACE = "ppg-serve"


def registry_name(app_name: str) -> str:
    return f"ppg-serve-policy-{app_name}"


@ray.remote(num_cpus=0)
class PolicyRegistry:
    def __init__(self) -> None:
        # A state dict arrives as torch tensors: import torch now (the registry starts with the app)
        # rather than inside the first publish, which a reload waits for (measured: the first
        # publish took 2-5 s on a busy 2-core machine, later ones 0.05 s).
        import torch  # noqa: F401

        self.deploy_id: str | None = None
        self.version = -1
        self.payload: str | list | None = None  # a path, or [ObjectRef] of a state dict

    def claim(self, deploy_id: str, version: int, path: str) -> int:
        """A replica of deployment ``deploy_id`` starts: a registry left by an earlier deployment of
        the same app (another checkpoint) is reset. Returns the newest version."""
        if deploy_id != self.deploy_id:
            self.deploy_id, self.version, self.payload = deploy_id, version, path
        return self.version

    def publish(self, version: int, weights) -> bool:
        """Record a newer version; an older or equal one is ignored (replays are harmless)."""
        if version <= self.version:
            return False
        self.version = version
        shared = shareable_weights(weights)
        self.payload = shared if isinstance(shared, str) else [shared]  # in a list: not dereferenced
        return True

    def newer_than(self, version: int):
        """``None``, or ``(version, path | [ObjectRef])`` when the registry holds a newer version."""
        return None if self.version <= version else (self.version, self.payload)

    def latest_version(self) -> int:
        return self.version


def get_registry(app_name: str):
    """The app's registry actor, created on first use. Detached so that it outlives the replica that
    created it; ``ppg serve`` kills it on shutdown (``kill_registry``)."""
    return PolicyRegistry.options(
        name=registry_name(app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def publish_policy(app_name: str, version: int, weights: Mapping | str | Path) -> bool:
    """Make every replica of ``app_name`` load ``weights`` as ``version`` within ``reload_poll_s``."""
    return ray.get(get_registry(app_name).publish.remote(version, weights))


def kill_registry(app_name: str) -> None:
    with contextlib.suppress(ValueError):  # never created
        ray.kill(ray.get_actor(registry_name(app_name), namespace=NAMESPACE))
