"""Test-session settings that must be in place before Ray or vLLM is imported anywhere."""

from __future__ import annotations

import os

import pytest

# Ray reads this once, at import: with it, a local node uses 127.0.0.1 and its servers listen on
# loopback only (without it Ray picks the machine's external address).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster on loopback (127.0.0.1 only), shared by every test that needs one."""
    import ray

    from ppg.serve.ingress import prepare_local_cluster

    started = not ray.is_initialized()
    if started:
        prepare_local_cluster("haproxy")  # serve.ingress's default, as ppg's own connect() does
        ray.init(
            num_cpus=4, include_dashboard=False, log_to_driver=False
        )  # logical slots: 2 workers + an LLM actor
    addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
    assert addresses == {"127.0.0.1"}, f"Ray is not on loopback: {addresses}"
    yield ray
    if started:
        ray.shutdown()


def scripted_episodes(
    problem_name: str, num_personas: int, per_persona: int = 2, num_turns: int | None = None
):
    """Real episodes without an engine: the scripted agent talks to the scripted partner, the rule
    judge scores it, and each conversation is rendered through the tiny model's chat template.
    Episodes of one persona share a group id (group baselines)."""
    from reference_episodes import episode_from_conversation
    from transformers import AutoTokenizer

    from ppg.config import load_config
    from ppg.env.conversation import run_conversations
    from ppg.env.judges import RuleJudge
    from ppg.env.partners import ScriptedPartner
    from ppg.env.personas import load_personas
    from ppg.env.problems import make_problem
    from ppg.env.scripted_agents import warm_start_agent
    from ppg.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded:tiny"))
    overrides = [f"problem.name={problem_name}"] + ([f"problem.num_turns={num_turns}"] if num_turns else [])
    problem = make_problem(load_config(None, overrides).problem)
    personas = load_personas()[:num_personas]
    n = num_personas * per_persona
    convs = run_conversations(
        problem,
        [p for p in personas for _ in range(per_persona)],
        list(range(n)),
        warm_start_agent(1),
        ScriptedPartner(),
        RuleJudge(),
    )
    return [
        episode_from_conversation(c, tokenizer, problem_name, group_id=i // per_persona, policy_version=0)
        for i, c in enumerate(convs)
    ]
