"""What asking is worth to a trained policy: the counterfactual behind "segment does not beat greedy".

On ``segmented`` a question about the user's taste at a topic's first turn earns 0 then and pays
later only through the recommendations that use the answer. Every class of the paper suite learned
to stop asking (EXPERIMENTS.md), including the segment class, which credits exactly the rest of the
segment. Whether that is a failure of credit assignment or the right call *for these policies* is a
counterfactual question, answered here by playing the same held-out conversations (same personas,
conversation seeds and per-turn sampling seeds) twice with each policy: as it is, and with the
canonical question ("what <topic> do you like?") forced at every segment's first turn. The paired
difference of each segment's return, by segment length, is the value of asking under that policy;
if it is negative at every length the policy cannot use the answer well enough for any horizon to
make asking pay, and the problem cannot separate the classes at this scale.

    .venv/bin/python benchmarks/ask_value.py        # ~4 min on 2 cores; benchmarks/results/ask_value_segmented.*
    .venv/bin/python benchmarks/ask_value.py --problem elicitation      # one topic: a question at turn 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ppg.config import load_config
from ppg.env import dialogue
from ppg.env.conversation import run_conversations
from ppg.env.factory import make_environment
from ppg.evaluate import mean_interval
from ppg.files import atomic_save_figure, atomic_write_csv, atomic_write_text
from ppg.learner.checkpoint import latest_checkpoint, list_checkpoints
from ppg.models import resolve_model
from ppg.rollout.engine import EngineConfig, HFEngine, SamplingSpec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "experiments" / "results" / "paper" / "runs"
SEED_OFFSET = 50_000  # conversation seeds apart from training's and the suite's evaluation's


def sampling_policy(engine: HFEngine, seeds: list[int], max_tokens: int):
    """The policy as training samples it (temperature 1), with a seed per conversation and turn, so
    the forced variant samples every other turn exactly as the plain one does."""

    def reply(conversations: list[list[dict]]) -> list[str]:
        turn = sum(m["role"] == "assistant" for m in conversations[0])
        texts = [
            engine.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
            for m in conversations
        ]
        prompts = [engine.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        turn_seeds = [(s + 7919 * turn) % 2**31 for s in seeds]
        out = engine.generate(prompts, SamplingSpec(max_tokens=max_tokens), turn_seeds)
        return [engine.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in out]

    return reply


def forcing_questions(policy, problem, seeds: list[int]):
    """``policy`` with the canonical taste question at every segment's first turn."""

    def reply(conversations: list[list[dict]]) -> list[str]:
        turn = sum(m["role"] == "assistant" for m in conversations[0])
        replies = policy(conversations)
        for i, (messages, seed) in enumerate(zip(conversations, seeds, strict=True)):
            focus = dialogue.focus_topic(messages[1:])
            if turn == problem.segment_start(turn, seed) and focus:
                replies[i] = dialogue.ask(focus)
        return replies

    return reply


def segments(conversation) -> list[tuple[int, float, bool]]:
    """(length, return, whether a later turn of it recommended the user's liked item) per segment."""
    liked = set(conversation.persona.preferences.values())
    replies = conversation.replies
    out = []
    for segment in sorted(set(conversation.segment_ids)):
        turns = [t for t, s in enumerate(conversation.segment_ids) if s == segment]
        hit = any(set(dialogue.parse(replies[t]).items) & liked for t in turns[1:])
        out.append((len(turns), sum(conversation.rewards[t] for t in turns), hit))
    return out


def measure(label: str, policy_path: str, env, args) -> list[dict]:
    seeds = [SEED_OFFSET + i for i in range(args.episodes)]
    personas = [env.eval_personas[i % len(env.eval_personas)] for i in range(args.episodes)]
    engine = HFEngine(policy_path, EngineConfig(seed=0))
    torch.manual_seed(0)
    plain_policy = sampling_policy(engine, seeds, args.max_tokens)
    plain = run_conversations(env.problem, personas, seeds, plain_policy, env.partner, env.judge)
    forced_policy = forcing_questions(sampling_policy(engine, seeds, args.max_tokens), env.problem, seeds)
    forced = run_conversations(env.problem, personas, seeds, forced_policy, env.partner, env.judge)
    all_pairs = [
        pair
        for p, f in zip(plain, forced, strict=True)
        for pair in zip(segments(p), segments(f), strict=True)  # the same segments: same seeds
    ]
    rows = []
    for length in sorted({a[0] for a, _ in all_pairs}):
        pairs = [(a, b) for a, b in all_pairs if a[0] == length]
        interval = mean_interval([b[1] - a[1] for a, b in pairs])
        diff, half = interval["mean"], interval["half_width"] or float("nan")
        rows.append(
            {
                "policy": label,
                "segment_length": length,
                "segments": len(pairs),
                "return_plain": statistics.fmean(a[1] for a, _ in pairs),
                "return_forced_question": statistics.fmean(b[1] for _, b in pairs),
                "value_of_asking": diff,
                "ci95": half,
                "liked_item_later_plain": statistics.fmean(a[2] for a, _ in pairs)
                if length > 1
                else float("nan"),
                "liked_item_later_forced": statistics.fmean(b[2] for _, b in pairs)
                if length > 1
                else float("nan"),
            }
        )
    return rows


def policies(args) -> dict[str, str]:
    found = {"initial": resolve_model("embedded:tiny")}
    for row in args.rows:
        for seed in args.seeds:
            run = args.runs / row / f"seed{seed}"
            if run.is_dir() and list_checkpoints(run):  # shipped results keep no checkpoints
                found[f"{row} seed {seed}"] = str(latest_checkpoint(run) / "policy")
    return found


def fmt(x: float) -> str:
    return "-" if x != x else f"{x:+.3f}" if abs(x) < 10 else f"{x:.0f}"


def write_markdown(rows: list[dict], path: Path, command: str, machine: str) -> None:
    lines = [
        f"Command: `{command}`  ",
        machine,
        "",
        "| policy | segment length | segments | return (plain) | return (question forced) | value of asking "
        "(95% CI) | liked item later: plain / forced |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['segment_length']} | {r['segments']} | {r['return_plain']:.3f} | "
            f"{r['return_forced_question']:.3f} | {fmt(r['value_of_asking'])} ± {r['ci95']:.3f} | "
            f"{fmt(r['liked_item_later_plain'])} / {fmt(r['liked_item_later_forced'])} |"
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, problem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["policy"].split(" seed")[0] for r in rows}, key=lambda g: g != "initial")
    lengths = sorted({r["segment_length"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(groups)
    for g, group in enumerate(groups):
        means = []
        for length in lengths:
            values = [
                r["value_of_asking"]
                for r in rows
                if r["policy"].split(" seed")[0] == group and r["segment_length"] == length
            ]
            means.append(statistics.fmean(values) if values else float("nan"))
        ax.bar([x + g * width for x in range(len(lengths))], means, width, label=group)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(
        [x + width * (len(groups) - 1) / 2 for x in range(len(lengths))], [f"L = {n}" for n in lengths]
    )
    ax.set_ylabel("segment return: question forced - plain")
    ax.set_title(f"{problem}: what a taste question at a segment's start is worth to each policy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problem", default="segmented", choices=["segmented", "elicitation"])
    parser.add_argument(
        "--runs", type=Path, help="the problem's runs/ folder of a suite (default: the paper suite's)"
    )
    parser.add_argument("--rows", nargs="+", default=["greedy", "segment", "full"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--episodes", type=int, default=128, help="held-out conversations per policy")
    parser.add_argument("--max-tokens", type=int, default=32, help="rollout.max_tokens_per_turn")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before, start = os.getloadavg(), time.perf_counter()
    args.runs = args.runs or RUNS / args.problem
    env = make_environment(load_config(None, [f"problem.name={args.problem}"]))
    found = policies(args)
    rows = []
    for label, path in tqdm(found.items(), desc="policies", unit="policy"):
        rows += measure(label, path, env, args)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/ask_value.py " + " ".join(argv or [])
    machine = (
        f"Machine: {os.cpu_count()} CPU cores; load average (1 min) {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; {time.perf_counter() - start:.0f} s."
    )
    name = f"ask_value_{args.problem}"
    atomic_write_csv(args.out / f"{name}.csv", rows)
    write_markdown(rows, args.out / f"{name}.md", command.strip(), machine)
    plot(rows, args.out / f"{name}.png", args.problem)
    print((args.out / f"{name}.md").read_text())
    return rows


if __name__ == "__main__":
    main()
