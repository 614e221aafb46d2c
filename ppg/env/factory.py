"""Build the environment a config names: problem, personas (train / held-out), partner and judge.

LLM partners and judges share one vLLM actor (``problem.partner_model``, or the policy's own model
when unset). The driver starts it (``ppg.driver.start_workers_chat_llm``) because it alone knows the
cluster's resources and stops it at the end; here it is only passed in as ``llm``.
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


def make_environment(config: PPGConfig, llm: Any = None) -> Environment:
    problem = make_problem(config.problem)
    train, held_out = split_personas(load_personas(config.problem.personas_file))
    if config.problem.uses_llm and llm is None:
        raise ValueError(
            "problem.partner or problem.judge is 'llm': pass the shared LLM client as llm= "
            "(the driver starts it: ppg.driver.start_workers_chat_llm)"
        )
    partner: Partner = LLMPartner(llm) if config.problem.partner == "llm" else ScriptedPartner()
    judges = {"rule": RuleJudge, "embedding": EmbeddingJudge, "llm": lambda: LLMJudge(llm)}
    judge: Judge = judges[config.problem.judge]()
    return Environment(problem, train, held_out, partner, judge)
