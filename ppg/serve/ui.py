"""The pages ``ppg serve`` shows a person: a chat with the live agent (``/``) and its training (``/live``).

Why pages at all: the only ways to meet the agent were to write an API client, and to watch it learn
a PNG at the end or TensorBoard. The pages are plain HTML and JavaScript package files
(``ppg/serve/static/``), no build step; the chat page talks to the same ``/v1/chat/completions`` as any
client, under the same bearer key, and shows the policy version that answered each line (the
``x-ppg-policy-version`` header).

What the pages need besides the OpenAI API, under the same key (``PolicyServer._authorize``):

* ``GET  /ui/personas``  the problem's personas, training and held-out, with the agent's system prompt;
* ``POST /ui/suggest``   the simulated user's line for a turn (the embedded model speaks only the
  small language it was trained on: the suggestion is a line it understands);
* ``POST /ui/score``     the problem's judge on one agent line: the per-turn score training would give;
* ``GET  /ui/run``       the run folder's metrics and latest sample dialogues (``ppg train
  serve.enabled=true`` names it; ``ppg serve`` on a run's checkpoint too): ``ppg/serve/run_view.py``.

They are left out of ``/openapi.json``, which documents the OpenAI-compatible API that clients and
the schema fuzzer rely on; their bodies are still validated (a bad one is a 400 naming the field).
The pages themselves carry no data and need no key; the page asks for one when an answer is a 401.
"""

from __future__ import annotations

import asyncio
import functools
import json
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ppg.config import ProblemConfig
from ppg.serve.errors import APIError
from ppg.serve.run_view import run_status

MAX_TEXT = 4000  # characters of one message the page may send to the helpers


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str = Field(max_length=MAX_TEXT)


class SuggestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    persona_id: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(default_factory=list, max_length=200, description="so far, no system")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    persona_id: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(max_length=200, description="before the reply, no system message")
    response: str = Field(max_length=MAX_TEXT, description="the agent's line to judge")


def page(name: str) -> str:
    return (resources.files("ppg.serve") / "static" / name).read_text(encoding="utf-8")


@functools.cache
def environment(problem_json: str):
    """The problem, its (train, held-out) personas by id, and a scripted user: built once per replica."""
    from ppg.env.partners import ScriptedPartner
    from ppg.env.personas import load_personas, split_personas
    from ppg.env.problems import make_problem

    config = ProblemConfig.model_validate_json(problem_json)
    train, held_out = split_personas(load_personas(config.personas_file))
    return make_problem(config), train, held_out, ScriptedPartner()


@functools.cache
def judge(problem_json: str):
    """The problem's judge, as training builds it (rule, embedding, or a plug-in); ``llm`` needs the
    shared LLM actor of a training run, which a server does not have."""
    from ppg.env.factory import JUDGE_METHODS, plugin_factory
    from ppg.env.judges import EmbeddingJudge, RuleJudge
    from ppg.env.plugins import build

    config = ProblemConfig.model_validate_json(problem_json)
    if config.judge == "rule":
        return RuleJudge()
    if config.judge == "embedding":
        return EmbeddingJudge()
    if config.judge == "llm":
        return None
    return build("problem.judge", config.judge, plugin_factory("judge", config.judge), JUDGE_METHODS)


def _server(request: Request):
    server = request.app.state.server
    server._authorize(request)
    return server


def _problem_json(server) -> str:
    return server.settings.problem.model_dump_json()


def _persona(server, persona_id: str):
    problem, train, held_out, partner = environment(_problem_json(server))
    for persona in (*train, *held_out):
        if persona.id == persona_id:
            return problem, persona, partner
    raise APIError(404, f"no persona {persona_id!r} in this problem's personas", param="persona_id")


async def chat_page() -> HTMLResponse:
    return HTMLResponse(page("chat.html"))


async def live_page() -> HTMLResponse:
    return HTMLResponse(page("live.html"))


async def personas(request: Request) -> JSONResponse:
    server = _server(request)
    problem, train, held_out, _ = await asyncio.to_thread(environment, _problem_json(server))

    def card(p, split: str) -> dict:
        return {"id": p.id, "name": p.name, "split": split, "about": p.describe(),
                "system_prompt": problem.system_prompt(p)}  # fmt: skip

    p = server.settings.problem
    return JSONResponse(
        {
            "problem": p.name,
            "aspect": problem.aspect,
            "num_turns": problem.num_turns,
            "judge": p.judge,
            "scores": p.judge != "llm",
            "model": server.model_id(),
            "personas": [card(x, "training") for x in train] + [card(x, "held-out") for x in held_out],
        }
    )


async def suggest(body: SuggestRequest, request: Request) -> JSONResponse:
    """The simulated user's next line for this conversation (turn = user lines so far)."""
    from ppg.env.partners import PartnerRequest

    server = _server(request)
    problem, persona, partner = _persona(server, body.persona_id)
    history = tuple(m.model_dump() for m in body.messages)
    turn = sum(m.role == "user" for m in body.messages)
    move = problem.user_move(persona, turn % problem.num_turns, body.seed)
    (text,) = partner.reply([PartnerRequest(persona, move, history, body.seed, turn)])
    return JSONResponse({"text": text, "turn": turn, "goal": move.goal})


async def score(body: ScoreRequest, request: Request) -> JSONResponse:
    """The judge's score in [-1, 1] for ``response`` after ``messages``, as training scores a turn
    (before the problem's gate and reward scale), and, for the rule judge, what it read."""
    from ppg.env.judges import JudgeRequest, RuleJudge

    server = _server(request)
    problem, persona, _ = _persona(server, body.persona_id)
    key = _problem_json(server)
    the_judge = await asyncio.to_thread(judge, key)
    if the_judge is None:
        raise APIError(
            409,
            "this server's problem.judge is llm, which needs a training run's shared LLM actor; "
            "serve with problem.judge=rule or embedding to see scores",
            param="problem.judge",
            code="judge_unavailable",
        )
    history = tuple(m.model_dump() for m in body.messages)
    req = JudgeRequest(persona, history, body.response, problem.aspect)
    if isinstance(the_judge, RuleJudge):
        verdict = await asyncio.to_thread(the_judge.read, req)
        return JSONResponse({"score": verdict.score, "kind": verdict.kind, "judge": "rule"})
    (value,) = await asyncio.to_thread(the_judge.score, [req])
    return JSONResponse({"score": float(value), "kind": None, "judge": server.settings.problem.judge})


async def run(request: Request) -> JSONResponse:
    server = _server(request)
    status = await asyncio.to_thread(run_status, server.settings.run_dir)
    status["served_version"] = server.version
    return JSONResponse(json.loads(json.dumps(status, default=str)))


def install_ui(app: FastAPI) -> None:
    """The pages and their helpers on the deployment's app (before ``serve.ingress`` takes it)."""
    for path, endpoint in (("/", chat_page), ("/live", live_page)):
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ui/personas", personas, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ui/suggest", suggest, methods=["POST"], include_in_schema=False)
    app.add_api_route("/ui/score", score, methods=["POST"], include_in_schema=False)
    app.add_api_route("/ui/run", run, methods=["GET"], include_in_schema=False)
