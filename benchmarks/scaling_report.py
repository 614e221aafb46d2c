"""The scaling benchmark's report: its markdown table, where vLLM pulls ahead, and its figure.

Apart from benchmarks/scaling.py so that each stays short; it reads only the rows (scaling.FIELDS).
"""

from __future__ import annotations

import math
from pathlib import Path

from ppg.files import atomic_save_figure, atomic_write_text


def crossing(points: list[tuple[int, str, float]]) -> str:
    """Where a ratio (sorted by parameters) rises past 1 for good, interpolated log-log between the
    two sizes around it: the size from which the candidate beats its baseline."""
    if not points:
        return "not measured"
    listed = ", ".join(f"{m} {r:.2f}x" for _, m, r in points)
    first = next((i for i in range(len(points)) if all(r > 1 for _, _, r in points[i:])), None)
    if first is None:
        return f"{listed}: vLLM is not ahead at the largest size measured"
    if first == 0:
        return f"{listed}: vLLM is ahead at every size measured, from {points[0][1]} on"
    (pa, ma, ra), (pb, mb, rb) = points[first - 1], points[first]
    t = -math.log(ra) / (math.log(rb) - math.log(ra)) if rb != ra else 0.0
    at = math.exp(math.log(pa) + t * (math.log(pb) - math.log(pa)))
    return f"{listed}: vLLM pulls ahead between {ma} and {mb}, near {at / 1e6:.2g}M parameters (log-log)"


def advantage_lines(rows: list[dict], batch_sizes: list[int]) -> list[str]:
    lines = []
    for b in batch_sizes:
        vllm = [r for r in rows if r["case"] == f"vllm batch={b}" and r["ratio"] != ""]
        points = sorted((r["parameters"], r["model"], r["ratio"]) for r in vllm)
        lines.append(f"- batch {b}: {crossing(points)}")
    return lines


def fmt(x) -> str:
    if x == "":
        return ""
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"


def write_markdown(rows: list[dict], path: Path, command: str, machine: str, batch_sizes: list[int]) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        machine,
        "",
        "Ratios are value / baseline, same model and run: for tokens/s and episodes/s above 1 is faster "
        "than the baseline, for seconds above 1 is slower.",
        "",
        "| model | parameters | section | case | median | unit | min - max | ratio vs baseline | baseline | notes |",
        "| --- | ---: | --- | --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        notes = [r["note"]] if r["note"] else []
        if r["tokens_per_prompt"] != "":
            notes.append(f"{r['tokens_per_prompt']:.1f} tokens/prompt")
        if r["torch_threads"] != "":
            notes.append(f"torch threads {r['torch_threads']}")
        if r["load_1min"] != "":
            notes.append(f"load {r['load_1min']:.1f}")
        spread = f"{fmt(r['min'])} - {fmt(r['max'])}" if r["min"] != "" else ""
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] != "" else "" if r["baseline"] else "(baseline)"
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['section']} | {r['case']} | {fmt(r['value'])} "
            f"| {r['unit']} | {spread} | {ratio} | {r['baseline']} | {'; '.join(notes)} |"
        )
    lines += ["", "Where vLLM's advantage over transformers generate begins (tokens/s ratio per size):", ""]
    lines += advantage_lines(rows, batch_sizes)
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


PANELS = {  # section: (title, y axis)
    "generation": ("generation (label: vLLM / transformers)", "tokens/s"),
    "learner": ("learner step (label: ppg / plain)", "s per step"),
    "weights": ("weight update (label: / state-dict copy)", "s per update"),
    "episodes": ("training (label: ppg / TRL)", "episodes/s"),
}


def plot(rows: list[dict], path: Path) -> None:
    """One panel per cost against parameter count (both axes log), the ratio written at each candidate
    point (baselines dashed), and a last panel of every ratio with the break-even line: where a ratio
    crosses it, the candidate starts to win."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["value"] != ""]
    sizes = sorted({(r["parameters"], r["model"]) for r in rows})

    def series(sel, case, key):
        pts = sorted((r["parameters"], r[key], r["ratio"]) for r in sel if r["case"] == case and r[key] != "")
        return [p for p, _, _ in pts], [v for _, v, _ in pts], [q for _, _, q in pts]

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    flat = list(axes.flat)
    for ax, (section, (title, unit)) in zip(flat, PANELS.items(), strict=False):
        sel = [r for r in measured if r["section"] == section]
        for case in dict.fromkeys(r["case"] for r in sel):
            xs, ys, ratios = series(sel, case, "value")
            base = next(r for r in sel if r["case"] == case)["baseline"] == ""
            ax.plot(xs, ys, "o--" if base else "o-", label=case)
            for x, y, q in zip(xs, ys, ratios, strict=True):
                if q != "":
                    ax.annotate(f"{q:.2f}x", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if sel:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, ylabel=f"{unit} (median, log scale)", yscale="log")
    rx = flat[len(PANELS)]
    for case in dict.fromkeys(r["case"] for r in measured if r["ratio"] != ""):
        xs, ratios, _ = series(measured, case, "ratio")
        rx.plot(xs, ratios, "o-", label=case)
    rx.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    rx.set(
        title="every ratio (rates: > 1 faster; seconds: > 1 slower)",
        ylabel="value / baseline (log)",
        yscale="log",
    )
    if any(r["ratio"] != "" for r in measured):
        rx.legend(fontsize=7, loc="best")
    for ax in flat[: len(PANELS) + 1]:
        ax.set_xscale("log")
        if sizes:
            ax.set_xlim(sizes[0][0] / 2, sizes[-1][0] * 2)
            ax.set_xticks([p for p, _ in sizes], [f"{m}\n{p / 1e6:.1f}M" for p, m in sizes])
            ax.minorticks_off()
        ax.set_xlabel("parameters")
        ax.grid(alpha=0.3)
    for ax in flat[len(PANELS) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
