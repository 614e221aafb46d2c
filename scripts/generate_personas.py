"""Generate the shipped persona catalogue, deterministically (seeded), into ppg/env/data/personas.jsonl.

python scripts/generate_personas.py            # rewrites the committed file; the diff should be empty
python scripts/generate_personas.py --count 200 --seed 7 --out my_personas.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ppg.env.personas import SHIPPED_PERSONAS, Persona
from ppg.env.vocabulary import CATEGORIES, FACT_SLOTS, TRAITS
from ppg.files import atomic_write_text

FIRST_NAMES = (
    "ada",
    "bo",
    "cleo",
    "dev",
    "eli",
    "fay",
    "gus",
    "hana",
    "ivo",
    "jun",
    "kai",
    "lena",
    "milo",
    "nia",
    "omar",
    "pia",
    "quinn",
    "rosa",
    "sami",
    "tara",
    "uma",
    "vik",
    "wren",
    "xena",
    "yuri",
    "zoe",
)


def generate(count: int, seed: int) -> list[Persona]:
    rng = random.Random(seed)
    personas = []
    for n in range(count):
        likes, dislikes = {}, {}
        for category, items in CATEGORIES.items():
            liked, disliked = rng.sample(items, 2)
            likes[category], dislikes[category] = liked, disliked
        personas.append(
            Persona(
                id=f"p{n:03d}",
                name=f"{rng.choice(FIRST_NAMES)}",
                traits=tuple(rng.sample(TRAITS, 2)),
                preferences=likes,
                dislikes=dislikes,
                facts={slot: rng.choice(values) for slot, values in FACT_SLOTS.items()},
                style={
                    "brevity": rng.choice(["terse", "brief", "chatty"]),
                    "formality": rng.choice(["casual", "formal"]),
                },
                setting=rng.choice(["chitchat", "patient", "student"]),
            )
        )
    return personas


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=SHIPPED_PERSONAS)
    args = parser.parse_args()
    lines = "".join(
        json.dumps(p.model_dump(mode="json"), sort_keys=True) + "\n" for p in generate(args.count, args.seed)
    )
    atomic_write_text(args.out, lines)
    print(f"wrote {args.count} personas to {args.out}")


if __name__ == "__main__":
    main()
