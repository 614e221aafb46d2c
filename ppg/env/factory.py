"""Build the environment a config names: problem, personas (train / held-out), partner and judge.

LLM partners and judges share one vLLM actor (``problem.partner_model``, or the policy's own model
when unset). The driver starts it (``ppg.driver.start_workers_chat_llm``) because it alone knows the
cluster's resources and stops it at the end; here it is only passed in as ``llm``.

A judge or partner of the user's own is named by import path (``problem.judge=pkg.module:name``,
``ppg.env.plugins``): a class or a factory that ppg calls without arguments, once per process that
plays conversations, and whose result has the method the conversation loop calls:

    judge    score(requests: list[JudgeRequest]) -> list[float]   one score in [-1, 1] per request
    partner  reply(requests: list[PartnerRequest]) -> list[str]   one user line per request

Both are called once per turn with every live conversation of the batch; ``check_environment``
resolves all three names before any process starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ppg.config import PPGConfig, ProblemConfig, is_import_path
from ppg.env.judges import EmbeddingJudge, Judge, LLMJudge, RuleJudge
from ppg.env.partners import LLMPartner, Partner, ScriptedPartner
from ppg.env.personas import Persona, load_personas, split_personas
from ppg.env.plugins import build, check_factory, import_object
from ppg.env.problems import Problem, make_problem

JUDGE_METHODS = ("score",)
PARTNER_METHODS = ("reply",)


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
    p = config.problem
    if is_import_path(p.partner):
        partner = build("problem.partner", p.partner, plugin_factory("partner", p.partner), PARTNER_METHODS)
    else:
        partner = LLMPartner(llm) if p.partner == "llm" else ScriptedPartner()
    if is_import_path(p.judge):
        judge = build("problem.judge", p.judge, plugin_factory("judge", p.judge), JUDGE_METHODS)
    else:
        judges = {"rule": RuleJudge, "embedding": EmbeddingJudge, "llm": lambda: LLMJudge(llm)}
        judge = judges[p.judge]()
    return Environment(problem, train, held_out, partner, judge)


def plugin_factory(field: str, path: str) -> Callable[[], Any]:
    """The checked zero-argument factory of a judge or partner plug-in (``field``: which)."""
    methods = JUDGE_METHODS if field == "judge" else PARTNER_METHODS
    return check_factory(f"problem.{field}", path, import_object(f"problem.{field}", path), methods)


def check_environment(config: PPGConfig | ProblemConfig) -> Problem:
    """Resolve what ``problem`` names - the problem (built: its settings are checked too) and any
    plug-in judge or partner (imported and checked, not built) - in this process, so a bad name fails
    before any worker starts; returns the problem. A ``PluginError`` or ``ProblemError`` names the field."""
    p = config.problem if isinstance(config, PPGConfig) else config
    problem = make_problem(p)
    for field in ("judge", "partner"):
        if is_import_path(getattr(p, field)):
            plugin_factory(field, getattr(p, field))
    return problem
