"""Resize the rollout pool of a running ``ppg train``, without touching its learner.

``ppg train`` runs its rollout workers behind a named Ray actor (``ppg-rollout-pool``); its
``resize(n)`` starts or stops workers while training goes on, and new workers get the current weights
before their first request. This script finds that actor on a cluster and calls it. Rollout workers
ask for the ``ppg_rollout`` resource (``rollout.resources``), so they land on the rollout node group
only; an autoscaling cluster (cluster/ray-cluster.gpu.yaml, deploy/kuberay/) adds rollout nodes for
them, and the learner group is never resized.

Run it as a Ray job (only the dashboard port needs to be reachable, e.g. through kubectl
port-forward), or as a driver on a cluster node:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python cluster/scale_rollout.py 4
    RAY_ADDRESS=127.0.0.1:6379 python cluster/scale_rollout.py 4

A resize the cluster cannot hold would leave the new workers pending: training goes on with the
workers it has (the pool activates a new one when it is placed), but this script's call would wait.
So the script refuses when the free resources do not cover the new workers, unless
``--allow-pending`` says an autoscaler will add nodes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import ray

from ppg.ray_session import POOL_ACTOR

WORKER_CLASS = "RolloutWorker"


class ScaleError(RuntimeError):
    """What went wrong and what to do about it (printed, exit code 2)."""


def find_pool(namespace: str | None, wait_s: float) -> tuple[str, object]:
    """The pool actor's namespace and handle; waits up to ``wait_s`` seconds for a run to create it."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [
            a["namespace"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"] == POOL_ACTOR and namespace in (None, a["namespace"])
        ]
        if len(found) == 1:
            try:
                return found[0], ray.get_actor(POOL_ACTOR, namespace=found[0])
            except ValueError:  # it ended between the listing and the lookup
                found = []
        if len(found) > 1:
            raise ScaleError(
                f"{len(found)} runs have a rollout pool (namespaces {', '.join(sorted(found))}); "
                "pick one with --namespace"
            )
        if time.monotonic() >= deadline:
            where = f" in namespace {namespace}" if namespace else ""
            raise ScaleError(
                f"no running ppg train{where}: no actor named {POOL_ACTOR} (use --wait to wait for one)"
            )
        time.sleep(1.0)


def worker_demand(namespace: str) -> dict[str, float]:
    """Resources one rollout worker of this run asks for (its actor's requirement, e.g. CPU and
    ppg_rollout), read from an alive worker."""
    from ray.util.state import list_actors

    workers = list_actors(
        filters=[
            ("class_name", "=", WORKER_CLASS),
            ("state", "=", "ALIVE"),
            ("ray_namespace", "=", namespace),
        ],
        detail=True,
        raise_on_missing_output=False,
    )
    if not workers:
        raise ScaleError("the pool has no alive rollout worker to read its resource demand from")
    return {k: float(v) for k, v in (workers[0].required_resources or {}).items()}


def shortfall(demand: dict[str, float], extra_workers: int, available: dict[str, float]) -> dict:
    """Per resource, how much ``extra_workers`` new workers need beyond what is free (empty: fits)."""
    short = {}
    for name, amount in demand.items():
        need = amount * extra_workers
        free = float(available.get(name, 0.0))
        if need > free + 1e-9:
            short[name] = (need, free)
    return short


def scale(num_workers: int, namespace: str | None, wait_s: float, allow_pending: bool) -> dict[str, int]:
    """Resize, or a ScaleError naming what happened: a run that ends (or whose pool dies) while the
    request is under way is an ordinary outcome, not a crash."""
    try:
        return _scale(num_workers, namespace, wait_s, allow_pending)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
        raise ScaleError(
            "the rollout pool stopped while it was being resized (the training run ended or lost its "
            f"pool: {type(e).__name__}); nothing more to scale. If a run is still going, try again."
        ) from None


def _scale(num_workers: int, namespace: str | None, wait_s: float, allow_pending: bool) -> dict[str, int]:
    ns, pool = find_pool(namespace, wait_s)
    before = ray.get(pool.versions.remote())  # also waits until the pool's first workers are up
    extra = num_workers - len(before)
    if extra > 0 and not allow_pending:
        short = shortfall(worker_demand(ns), extra, ray.available_resources())
        if short:
            lacking = ", ".join(f"{k}: needs {need:g}, {free:g} free" for k, (need, free) in short.items())
            raise ScaleError(
                f"{extra} more rollout worker(s) do not fit ({lacking}). Add rollout nodes (more "
                "ppg_rollout), or pass --allow-pending on an autoscaling cluster (the new workers join "
                "training when the new nodes are up)."
            )
    ray.get(pool.resize.remote(num_workers, wait=not allow_pending))
    after = ray.get(pool.versions.remote())
    versions = sorted(set(after.values()))
    print(
        f"[ppg] rollout pool (namespace {ns}): {len(before)} -> {len(after)} workers "
        f"({', '.join(sorted(after))}); policy version(s) {versions}",
        flush=True,
    )
    return after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Resize the rollout pool of a running `ppg train` (the learner is not touched).",
        epilog="example: ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
        "python cluster/scale_rollout.py 4",
    )
    parser.add_argument("num_workers", type=int, help="rollout workers wanted (>= 1)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, as in a job)")
    parser.add_argument("--namespace", help="the run's Ray namespace, when several runs share a cluster")
    parser.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait S seconds for a run")
    parser.add_argument(
        "--allow-pending",
        action="store_true",
        help="resize even if the free resources do not cover the new workers (autoscaling clusters)",
    )
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error("num_workers must be >= 1")

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    try:
        scale(args.num_workers, args.namespace, args.wait, args.allow_pending)
    except ScaleError as e:
        print(f"scale_rollout: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
