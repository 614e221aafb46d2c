"""The warm-start corpus: scripted dialogues that teach the tiny model the conversation language.

Played by ``scripted_agents.warm_start_agent`` (each rewarded behaviour at a low but non-zero rate)
on every registered problem, with the *training* personas only: held-out personas never reach the
model's weights, so evaluating on them measures generalisation. The same dialogues train the
tokenizer, so every word the problems use is in its vocabulary.
"""

from __future__ import annotations

import random

from ppg.env.conversation import run_conversations
from ppg.env.judges import RuleJudge
from ppg.env.partners import ScriptedPartner
from ppg.env.personas import load_personas, split_personas
from ppg.env.problems import PROBLEMS, ProblemConfig
from ppg.env.scripted_agents import warm_start_agent


def sft_conversations(num_conversations: int = 800, seed: int = 0) -> list[list[dict]]:
    """Scripted dialogues over every registered problem (each family an equal share) and the shipped
    training personas; deterministic."""
    rng = random.Random(seed)
    train, _ = split_personas(load_personas())
    names = sorted(PROBLEMS)
    families = sorted({PROBLEMS[n].family for n in names})
    out: list[list[dict]] = []
    for k, name in enumerate(names):
        # Each family gets an equal share, so the many persona domains do not crowd out the rest.
        siblings = sum(PROBLEMS[n].family == PROBLEMS[name].family for n in names)
        per_problem = -(-num_conversations // (len(families) * siblings))
        problem = PROBLEMS[name](ProblemConfig(name=name))
        chosen = [rng.choice(train) for _ in range(per_problem)]
        seeds = [rng.randrange(2**31) for _ in range(per_problem)]
        convs = run_conversations(
            problem, chosen, seeds, warm_start_agent(seed * 1000 + k), ScriptedPartner(), RuleJudge()
        )
        out += [c.messages for c in convs]
    rng.shuffle(out)
    return out[:num_conversations]
