"""Does a warm start copy? Build a tiny model on a given SFT corpus and measure P(stated item).

    .venv/bin/python benchmarks/copy_probe.py                                   # the shipped recipe
    .venv/bin/python benchmarks/copy_probe.py --data myopic --copy 0.3 --steps 1500
    .venv/bin/python benchmarks/copy_probe.py --data alignment --copy 0.3 --steps 900

Every problem's reward needs the policy to copy a word from its context (the user's stated taste,
its persona's fact). This trains the embedded recipe's tokenizer and model on the chosen corpus and
prints the probability of the stated item after "i like <item>. any <topic> ideas?" + "you should
try", among the 8 items of its category (chance: 0.125). Minutes per run; nothing is cached.
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def corpus(data: str, n: int) -> list[list[dict]]:
    from ppg.config import ProblemConfig
    from ppg.env.conversation import run_conversations
    from ppg.env.corpus import sft_conversations
    from ppg.env.judges import RuleJudge
    from ppg.env.partners import ScriptedPartner
    from ppg.env.personas import load_personas, split_personas
    from ppg.env.problems import make_problem
    from ppg.env.scripted_agents import warm_start_agent

    if data == "all":
        return sft_conversations(n, 0)
    names = {"myopic": ["myopic"], "alignment": ["myopic", "elicitation", "segmented"]}[data]
    train, _ = split_personas(load_personas())
    out = []
    for k, name in enumerate(names):
        m = n // len(names)
        personas = [random.Random(i).choice(train) for i in range(m)]
        convs = run_conversations(
            make_problem(ProblemConfig(name=name)),
            personas,
            list(range(m)),
            warm_start_agent(k),
            ScriptedPartner(),
            RuleJudge(),
        )
        out += [c.messages for c in convs]
    random.Random(0).shuffle(out)
    return out


def copy_probability(model, tokenizer) -> float:
    from ppg.env.vocabulary import CATEGORIES

    system = {"role": "system", "content": "you are a helpful assistant. suggest things the user will enjoy."}
    total, n = 0.0, 0
    for category, items in CATEGORIES.items():
        for item in items[:4]:
            user = {"role": "user", "content": f"i like {item}. any {category} ideas?"}
            ids = list(
                tokenizer.apply_chat_template([system, user], add_generation_prompt=True, return_dict=False)
            )
            ids += tokenizer.encode("you should try", add_special_tokens=False)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            candidates = [tokenizer.encode(" " + i, add_special_tokens=False)[0] for i in items]
            total += float(torch.softmax(logits[candidates], 0)[items.index(item)])
            n += 1
    return total / n


def main() -> None:
    from ppg.env import scripted_agents
    from ppg.models.sft import SFTSpec, train_sft
    from ppg.models.tiny import TinyModelSpec, init_model
    from ppg.models.tokenizer import conversation_texts, train_tokenizer

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=["all", "myopic", "alignment"], default="all")
    parser.add_argument("--conversations", type=int, default=1600)
    parser.add_argument("--copy", type=float, default=scripted_agents.WarmStartRates.copy_taste)
    parser.add_argument("--truthful", type=float, default=scripted_agents.WarmStartRates.truthful)
    parser.add_argument("--steps", type=int, default=SFTSpec().steps)
    parser.add_argument("--batch-size", type=int, default=SFTSpec().batch_size)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scripted_agents.WarmStartRates.copy_taste = args.copy
    scripted_agents.WarmStartRates.truthful = args.truthful

    conversations = corpus(args.data, args.conversations)
    tokenizer = train_tokenizer(conversation_texts(conversations), vocab_size=TinyModelSpec().vocab_size)
    model = init_model(TinyModelSpec(), tokenizer)
    start = time.perf_counter()
    result = train_sft(model, tokenizer, conversations, SFTSpec(steps=args.steps, batch_size=args.batch_size))
    print(
        f"data={args.data} copy={args.copy} truthful={args.truthful} steps={args.steps}x{args.batch_size}: "
        f"P(stated item)={copy_probability(model, tokenizer):.3f} (chance 0.125), "
        f"final loss {sum(result.losses[-20:]) / 20:.3f}, {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
