"""RolloutWorker: one Ray actor, one generation engine, whole batches of multi-turn episodes.

Its public methods are the whole protocol with the pool: ``ready``, ``rollout(request)``,
``update_weights(version, weights)``, ``version``. Requests and results are small dataclasses of
plain data; weights travel through the Ray object store (or as a checkpoint folder path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
import torch

from ppg.config import PPGConfig
from ppg.env.factory import make_environment
from ppg.env.llm import RemoteChatLLM
from ppg.episode import Episode
from ppg.ray_session import CHAT_LLM_ACTOR
from ppg.rollout.engine import EngineConfig, SamplingSpec, Weights, make_engine
from ppg.rollout.trace import TokenPolicy


@dataclass(frozen=True)
class RolloutRequest:
    """One unit of work: conversations with these personas and seeds, in these baseline groups."""

    request_id: int
    persona_ids: tuple[str, ...]
    seeds: tuple[int, ...]
    group_ids: tuple[int, ...]
    split: str = "train"  # or "eval": held-out personas
    sampling_seed: int | None = None  # conversation i samples with its own stream: reproducible anywhere


@dataclass
class RolloutResult:
    request_id: int
    worker: str
    policy_version: int
    episodes: list[Episode]
    seconds: dict[str, float] = field(default_factory=dict)  # generate / partner+judge / total


class RolloutWorker:
    def __init__(self, config: dict, model_path: str, name: str, engine: str = "vllm") -> None:
        self.config = PPGConfig.model_validate(config)
        self.name = name
        m, r = self.config.model, self.config.rollout
        engine_config = EngineConfig(
            dtype=m.dtype,
            max_model_len=m.max_model_len,
            trust_remote_code=m.trust_remote_code,
            seed=self.config.run.seed,
            kv_cache_gib=r.kv_cache_gib,
        )
        torch.set_num_threads(max(1, int(r.cpus_per_worker)))  # as many threads as CPUs reserved
        self.engine = make_engine(engine, model_path, engine_config)
        self._set_environment()
        self.policy_version = 0

    def _set_environment(self) -> None:
        """The conversation side of ``self.config``: problem, partner, judge, personas, sampling."""
        llm = RemoteChatLLM(ray.get_actor(CHAT_LLM_ACTOR)) if self.config.problem.uses_llm else None
        self.env = make_environment(self.config, llm=llm)
        self.personas = {p.id: p for p in self.env.train_personas + self.env.eval_personas}
        r = self.config.rollout
        self.sampling = SamplingSpec(r.max_tokens_per_turn, r.temperature, r.top_p)

    def ready(self) -> str:
        return self.name

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec) -> list:
        """Raw token-in/token-out access to this worker's engine (evaluation, benchmarks, tests)."""
        return self.engine.generate(prompts, sampling)

    def version(self) -> int:
        return self.policy_version

    def reconfigure(self, config: dict, version: int, weights: Weights) -> int:
        """Serve another run with the same engine (``ppg experiment``: one pool for a whole grid):
        a new problem, judge, partner and sampling, and ``weights`` as ``version``. What the engine was
        built with (model, dtype, context, KV cache) cannot change without a restart."""
        new = PPGConfig.model_validate(config)

        def engine_settings(c: PPGConfig) -> tuple:
            return c.model, c.rollout.engine, c.rollout.kv_cache_gib

        if engine_settings(new) != engine_settings(self.config):
            raise ValueError(
                "reconfigure cannot change model.*, rollout.engine or rollout.kv_cache_gib: start a new pool"
            )
        self.config = new
        self._set_environment()
        return self.update_weights(version, weights)

    def update_weights(self, version: int, weights: Weights) -> int:
        self.engine.update_weights(weights)
        self.policy_version = version
        return version

    def rollout(self, request: RolloutRequest) -> RolloutResult:
        from ppg.env.conversation import run_conversations

        start = time.perf_counter()
        missing = [p for p in request.persona_ids if p not in self.personas]
        if missing:
            raise KeyError(f"unknown persona ids {missing[:5]}")
        personas = [self.personas[p] for p in request.persona_ids]
        seeds = None
        if request.sampling_seed is not None:
            seeds = [(request.sampling_seed * 1_000_003 + i) % 2**31 for i in range(len(personas))]
        policy = TimedPolicy(TokenPolicy(self.engine, self.sampling, self.config.model.max_model_len, seeds))
        version = self.policy_version  # weights change only between requests (actor calls are serial)
        conversations = run_conversations(
            self.env.problem, personas, list(request.seeds), policy, self.env.partner, self.env.judge
        )
        episodes = [
            Episode(
                self.config.problem.name,  # as configured: a plug-in's import path too
                c.persona.id,
                g,
                version,
                c.messages,
                list(c.rewards),
                list(c.segment_ids),
                t.ids,
                t.agent_mask,
                t.token_turn,
                t.logprobs,
            )
            for c, g, t in zip(conversations, request.group_ids, policy.inner.traces, strict=True)
        ]
        total = time.perf_counter() - start
        seconds = {"generate": policy.seconds, "environment": total - policy.seconds, "total": total}
        return RolloutResult(request.request_id, self.name, version, episodes, seconds)


class TimedPolicy:
    """Counts the time spent in the engine, to split generate from partner/judge time."""

    def __init__(self, inner: TokenPolicy) -> None:
        self.inner, self.seconds = inner, 0.0

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        start = time.perf_counter()
        try:
            return self.inner(conversations)
        finally:
            self.seconds += time.perf_counter() - start
