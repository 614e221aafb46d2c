"""Build the environment a config names: problem, personas (train / held-out), partner and judge.

LLM partners and judges share one vLLM actor (``problem.partner_model``, or the policy's own model
when unset), started here on first need; pass ``llm`` to reuse an engine that is already running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ppg.config import PPGConfig
from ppg.env.judges import EmbeddingJudge, Judge, LLMJudge, RuleJudge
from ppg.env.partners import LLMPartner, Partner, ScriptedPartner
from ppg.env.personas import Persona, load_personas, split_personas
from ppg.env.problems import Problem, make_problem


@dataclass
class Environment:
    problem: Problem
    train_personas: list[Persona]
    eval_personas: list[Persona]
    partner: Partner
    judge: Judge
    llm: Any = None  # the shared LLM client, when the partner or judge needs one


def make_environment(config: PPGConfig, llm: Any = None) -> Environment:
    problem = make_problem(config.problem)
    train, held_out = split_personas(load_personas(config.problem.personas_file))
    needs_llm = config.problem.partner == "llm" or config.problem.judge == "llm"
    if needs_llm and llm is None:
        llm = start_shared_llm(config)
    partner: Partner = LLMPartner(llm) if config.problem.partner == "llm" else ScriptedPartner()
    judges = {"rule": RuleJudge, "embedding": EmbeddingJudge, "llm": lambda: LLMJudge(llm)}
    judge: Judge = judges[config.problem.judge]()
    return Environment(problem, train, held_out, partner, judge, llm)


def start_shared_llm(config: PPGConfig) -> Any:
    import ray

    from ppg.env.llm import RemoteChatLLM, start_chat_llm_actor
    from ppg.models import resolve_model

    path = resolve_model(config.problem.partner_model or config.model.name_or_path)
    actor = start_chat_llm_actor(path, num_cpus=1, trust_remote_code=config.model.trust_remote_code)
    ray.get(actor.ready.remote())
    return RemoteChatLLM(actor)
