"""RolloutPool: N rollout workers, resizable while a run goes, that lose no episode when one dies.

Work is a list of ``RolloutRequest``s with unique ids; results are kept by request id, so a request
that is re-issued after its worker died can never be counted twice, and ``collect`` returns exactly
the requested episodes in request order. New workers (from ``resize`` or a replacement) receive the
current weights before they take any work.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
from collections import deque
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from ppg.config import PPGConfig
from ppg.env.personas import Persona
from ppg.episode import Episode
from ppg.ray_session import shareable_weights
from ppg.rollout.engine import engine_actor_env
from ppg.rollout.worker import RolloutRequest, RolloutResult, RolloutWorker
from ppg.weights import SharedWeights, Weights, check_weights_fit, tensor_shapes

log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """A rollout request that failed inside a live worker: not a worker death, not retried."""


class RolloutPool:
    def __init__(
        self,
        config: PPGConfig,
        model_path: str,
        num_workers: int | None = None,
        name_prefix: str = "ppg-rollout",
    ) -> None:
        self.config, self.model_path, self.name_prefix = config, model_path, name_prefix
        context = ray.get_runtime_context()  # the pool runs as an actor, or in the caller's process
        if context.get_actor_id() is not None and context.was_current_actor_reconstructed:
            # Ray restarted this pool after its process died (run.max_failures): the old workers
            # died with it, but their names may still be held until Ray has noticed; use new ones.
            self.name_prefix = f"{name_prefix}-{os.getpid()}"
        self._shapes = tensor_shapes(model_path)  # what every weight update must match
        self.workers: dict[str, Any] = {}  # name -> actor handle
        self.policy_version = 0
        self._weights: Any = None  # ObjectRef of the latest state dict, or a checkpoint path
        self._next_index = 0
        self._starting: dict[str, tuple[Any, Any]] = {}  # launched, not ready yet: name -> (actor, ready ref)
        self._lock = threading.RLock()
        self._target = num_workers or config.rollout.num_workers
        self.replaced = 0  # workers replaced after dying (for metrics and tests)
        self._busy: set[str] = set()  # workers running a request of the current collect
        self._reconcile(wait=True)

    # --- size ---------------------------------------------------------------------------------

    def resize(self, num_workers: int, wait: bool = True) -> None:
        """Grow or shrink to ``num_workers``; safe while ``collect`` runs (busy workers finish first).
        ``wait``: return once the new workers are up. Either way the pool's lock is never held while
        a worker waits for resources, so training goes on with the workers it has."""
        if num_workers < 1:
            raise ValueError(f"rollout.num_workers must be >= 1, got {num_workers}")
        with self._lock:
            self._target = num_workers
        self._reconcile(wait=wait)  # collect's busy workers (if one runs) are not the ones stopped

    def _reconcile(self, busy: set[str] | None = None, wait: bool = False) -> None:
        """Launch or stop workers toward the target; activate the launched ones that are ready.
        ``wait``: block (without the lock) until every launched worker is ready."""
        busy = busy if busy is not None else self._busy
        with self._lock:
            while len(self.workers) + len(self._starting) < self._target:
                self._launch_worker()
            while len(self.workers) + len(self._starting) > self._target and self._starting:
                name, (actor, _) = self._starting.popitem()  # not started yet: the cheapest to drop
                ray.kill(actor)
            idle = [n for n in self.workers if n not in busy]
            while len(self.workers) + len(self._starting) > self._target and idle:
                self._stop_worker(idle.pop())
            starting = dict(self._starting)
        if not starting:
            return
        refs = {ref: name for name, (_, ref) in starting.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=None if wait else 0)
        for ref in ready:
            self._activate(refs[ref], ref)

    def _launch_worker(self) -> None:
        r = self.config.rollout
        name = f"{self.name_prefix}-{self._next_index}"
        self._next_index += 1
        actor = (
            _remote_worker_class()
            .options(
                name=name,
                num_cpus=r.cpus_per_worker,
                num_gpus=r.gpus_per_worker,
                resources=dict(r.resources),  # e.g. {ppg_rollout: 1}: the cluster's rollout node group
                max_restarts=0,
                runtime_env={"env_vars": engine_actor_env(r.kv_cache_gib)},
            )
            .remote(self.config.model_dump(mode="json"), self.model_path, name, r.engine)
        )
        self._starting[name] = (actor, actor.ready.remote())

    def _activate(self, name: str, ready_ref) -> None:
        """A launched worker is ready: give it the current weights, then work. A worker that failed
        to start raises here (a bad model path or config fails loudly, not in a retry loop)."""
        with self._lock:
            entry = self._starting.pop(name, None)
            if entry is None:  # dropped by a shrink meanwhile
                return
            actor = entry[0]
            ray.get(ready_ref)
            if self._weights is not None:  # current weights before any work
                ray.get(actor.update_weights.remote(self.policy_version, self._weights))
            self.workers[name] = actor
        log.info("rollout worker %s started (policy version %d)", name, self.policy_version)

    def _stop_worker(self, name: str) -> None:
        actor = self.workers.pop(name)
        ray.kill(actor)
        log.info("rollout worker %s stopped", name)

    # --- weights ------------------------------------------------------------------------------

    def update_weights(self, version: int, weights: Weights) -> dict[str, int]:
        """Push version ``version`` to every worker; returns each worker's reported version.
        Weights of another model are refused here (WeightsMismatch), before any worker, or any
        worker started later, is given them."""
        check_weights_fit(self._shapes, weights, f"version {version}")
        ref = shareable_weights(weights)
        with self._lock:
            self._weights, self.policy_version = ref, version
            own_copy = None
            if isinstance(weights, SharedWeights):
                # The learner owns that object and a learner that dies takes it along; workers
                # started later need the weights, so the pool keeps a copy of its own, made while
                # the workers load (not before, as when the pool was handed the state dict itself).
                def own_copy() -> None:
                    self._weights = ray.put(ray.get(ref))

            acks = self._call_every_worker("update_weights", version, ref, meanwhile=own_copy)
        self._reconcile(wait=False)
        return acks

    def reconfigure(
        self, config: PPGConfig, version: int, weights: Weights, keep_size: bool = False
    ) -> dict[str, int]:
        """Point every worker (and every later one) at a new run's config and weights, keeping the
        engines: starting vLLM is the expensive part of a pool. Returns each worker's version.
        ``keep_size``: keep the pool's current size (a run's learner restarting) instead of the
        config's ``rollout.num_workers`` (a new run)."""
        check_weights_fit(self._shapes, weights, f"version {version}")
        ref = shareable_weights(weights)
        with self._lock:
            self.config, self._weights, self.policy_version = config, ref, version
            payload = config.model_dump(mode="json")
            acks = self._call_every_worker("reconfigure", payload, version, ref)
            if not keep_size:
                self._target = config.rollout.num_workers
        self._reconcile(busy=set(), wait=True)  # replacements of the dead start with these weights
        return acks

    def versions(self) -> dict[str, int]:
        with self._lock:
            return self._call_every_worker("version")

    def _call_every_worker(self, method: str, *args: Any, meanwhile=None) -> dict[str, Any]:
        """Call ``method`` on every worker (caller holds the lock); ``meanwhile()`` runs while they
        work. A worker found dead here is dropped, not fatal: a restarting learner's first call may
        race the death of a worker, and the next reconcile launches its replacement, which gets the
        current weights before work."""
        refs = {name: getattr(actor, method).remote(*args) for name, actor in self.workers.items()}
        if meanwhile is not None:
            meanwhile()
        answers: dict[str, Any] = {}
        for name, ref in refs.items():
            try:
                answers[name] = ray.get(ref)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                if isinstance(e, RayTaskError):  # raised by the worker's own code: a real error
                    raise
                log.warning(
                    "rollout worker %s died (%s) during %s; it will be replaced",
                    name,
                    type(e).__name__,
                    method,
                )
                actor = self.workers.pop(name)
                self.replaced += 1
                if isinstance(e, ActorUnavailableError):
                    ray.kill(actor)
        return answers

    # --- work ---------------------------------------------------------------------------------

    def collect(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        """Run every request once, on whichever worker is free; re-issue a dead worker's request."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within a collect call")
        pending = deque(requests)
        in_flight: dict[Any, tuple[str, RolloutRequest]] = {}
        results: dict[int, RolloutResult] = {}
        self._busy = set()
        try:
            while pending or in_flight:
                self._reconcile(self._busy)
                for name in [n for n in list(self.workers) if n not in self._busy]:
                    if not pending:
                        break
                    request = pending.popleft()
                    in_flight[self.workers[name].rollout.remote(request)] = (name, request)
                    self._busy.add(name)
                if not in_flight:  # every worker died: wait for a replacement to come up
                    self._reconcile(self._busy, wait=True)
                    continue
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in done:
                    name, request = in_flight.pop(ref)
                    self._busy.discard(name)
                    try:
                        result = ray.get(ref)
                    except RayTaskError as e:
                        # Raised by the rollout code itself (a bug, a bad request, an unavailable
                        # judge): the worker is alive and redoing the request would fail the same way.
                        # Ray can dress such an error as its cause's type (even an actor error), so
                        # this test comes before the dead-worker one.
                        raise RolloutError(
                            f"rollout request {request.request_id} failed inside worker {name} (the "
                            f"worker is alive and was kept): {e.cause!r}"
                        ) from e
                    except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                        log.warning(
                            "rollout worker %s died (%s); replacing it and re-issuing request %d",
                            name,
                            type(e).__name__,
                            request.request_id,
                        )
                        with self._lock:
                            actor = self.workers.pop(name, None)
                            self.replaced += 1
                        if actor is not None and isinstance(e, ActorUnavailableError):
                            ray.kill(actor)  # unreachable, maybe alive: never two workers for one slot
                        pending.appendleft(request)
                        continue
                    if request.request_id not in results:  # a result is accepted once
                        results[request.request_id] = result
        finally:
            self._busy = set()
        return [results[i] for i in ids]

    def episodes(self, requests: list[RolloutRequest]) -> list[Episode]:
        return [e for result in self.collect(requests) for e in result.episodes]

    def shutdown(self) -> None:
        with self._lock:
            self._target = 0
            for actor, _ in self._starting.values():
                ray.kill(actor)
            self._starting.clear()
            for name in list(self.workers):
                self._stop_worker(name)


@functools.cache
def _remote_worker_class() -> Any:
    return ray.remote(RolloutWorker)


def plan_requests(
    personas: list[Persona],
    num_episodes: int,
    group_size: int,
    num_requests: int,
    seed: int,
    first_request_id: int = 0,
    split: str = "train",
) -> list[RolloutRequest]:
    """An iteration's work: num_episodes / group_size groups, each ``group_size`` conversations with
    one persona and one conversation seed (same plan, independent samples: the group baseline's
    "same prompt"), split into up to ``num_requests`` requests of whole groups. Deterministic in seed."""
    if num_episodes % group_size:
        raise ValueError(f"episodes ({num_episodes}) must be a multiple of group_size ({group_size})")
    rng = random.Random(seed)
    groups = [(rng.choice(personas).id, rng.randrange(2**31)) for _ in range(num_episodes // group_size)]
    num_requests = max(1, min(num_requests, len(groups)))
    requests = []
    for k in range(num_requests):
        chunk = list(range(len(groups)))[k::num_requests]
        requests.append(
            RolloutRequest(
                request_id=first_request_id + k,
                persona_ids=tuple(groups[g][0] for g in chunk for _ in range(group_size)),
                seeds=tuple(groups[g][1] for g in chunk for _ in range(group_size)),
                group_ids=tuple(g for g in chunk for _ in range(group_size)),
                split=split,
                sampling_seed=rng.randrange(2**31),
            )
        )
    return requests
