"""Gradient-estimate variance and bias per policy class on the tabular conversation MDPs.

For each MDP, policy class and batch size n, draws R independent batches, estimates the gradient
through the real Objective + policy_gradient_loss, and compares with exact answers by enumeration:

  variance      trace of the covariance of one batch's estimate (falls as 1/n)
  bias_own      |mean estimate - exact partial gradient of the class|   (should be ~ noise)
  bias_full     |exact partial gradient - exact full-planning gradient| (what the class gives up)
  mse_full      E|estimate - full-planning gradient|^2 = bias_full^2 + variance (+ noise in bias_own)

Small subsets trade bias_full for variance: on myopic rewards bias_full is 0 and greedy wins at every n;
on delayed rewards greedy's bias never goes away and planning wins once n is large enough.

    python benchmarks/variance.py                     # writes benchmarks/results/variance.{csv,md,png}
    python benchmarks/variance.py --repeats 100 --sizes 4 16   # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ppg.files import atomic_save_figure, atomic_write_csv, atomic_write_text
from ppg.objectives import FullPlanning, Greedy, KStep, Objective, Segment, TurnMean
from ppg.tabular_mdp import (
    delayed_mdp,
    exact_partial_gradient,
    myopic_mdp,
    random_mdp,
    reference_policy,
    sample_gradient_estimates,
)

RESULTS = Path(__file__).resolve().parent / "results"


def problems():
    """name -> (mdp, theta). Each MDP gets a segment boundary halfway, for the segment class."""
    mdps = {
        "myopic": myopic_mdp(horizon=5, noise=2.0),
        "delayed": delayed_mdp(horizon=6, noise=0.5),
        "random": random_mdp(seed=0, horizon=5),
    }
    out = {}
    for name, mdp in mdps.items():
        mdp = dataclasses.replace(mdp, segment_boundaries=(mdp.horizon // 2,))
        theta = reference_policy(mdp) if name != "delayed" else torch.zeros(2, 3, dtype=torch.double)
        out[name] = (mdp, theta)
    return out


POLICY_CLASSES = [FullPlanning(), KStep(k=2), Segment(), Greedy()]


def label(policy_class) -> str:
    return f"k_step(k={policy_class.k})" if isinstance(policy_class, KStep) else policy_class.type


def run(sizes: list[int], repeats: int, seed: int) -> list[dict]:
    jobs = [(p, pc, n) for p in problems().items() for pc in POLICY_CLASSES for n in sizes]
    exact_cache: dict[tuple[str, str], torch.Tensor] = {}

    def exact_gradient(name, mdp, theta, objective):
        key = (name, label(objective.policy_class))
        if key not in exact_cache:  # enumeration is the slow part; it does not depend on n
            exact_cache[key] = exact_partial_gradient(mdp, theta, objective)[1]
        return exact_cache[key]

    rows = []
    for (name, (mdp, theta)), policy_class, n in tqdm(jobs, desc="variance", unit="config"):
        objective = Objective(policy_class=policy_class, baseline=TurnMean())
        exact = exact_gradient(name, mdp, theta, objective)
        full = exact_gradient(name, mdp, theta, Objective(policy_class=FullPlanning(), baseline=TurnMean()))
        start = time.perf_counter()
        estimates = sample_gradient_estimates(mdp, theta, objective, repeats, n, 1, seed=seed)
        mean = estimates.mean(0)
        variance = estimates.var(0).sum().item()
        rows.append(
            {
                "problem": name,
                "policy_class": label(policy_class),
                "episodes_per_batch": n,
                "variance": variance,
                "bias_own": (mean - exact).norm().item(),
                "bias_own_noise": (variance / repeats) ** 0.5,
                "bias_full": (exact - full).norm().item(),
                "mse_full": ((estimates - full) ** 2).sum((1, 2)).mean().item(),
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def write_markdown(rows: list[dict], path: Path, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| problem | policy class | n | variance | bias vs own target (noise) | bias vs full gradient | MSE vs full gradient |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['policy_class']} | {r['episodes_per_batch']} | {r['variance']:.4f} | "
            f"{r['bias_own']:.4f} ({r['bias_own_noise']:.4f}) | {r['bias_full']:.4f} | {r['mse_full']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["problem"] for r in rows))
    classes = list(dict.fromkeys(r["policy_class"] for r in rows))
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), squeeze=False)
    for j, name in enumerate(names):
        for pc in classes:
            sel = [r for r in rows if r["problem"] == name and r["policy_class"] == pc]
            n = [r["episodes_per_batch"] for r in sel]
            axes[0, j].plot(n, [r["variance"] for r in sel], marker="o", label=pc)
            axes[1, j].plot(n, [r["mse_full"] for r in sel], marker="o", label=pc)
        axes[0, j].set_title(f"{name}: variance of the estimate")
        axes[1, j].set_title(f"{name}: MSE vs full-planning gradient")
        for i in range(2):
            axes[i, j].set_xscale("log", base=2)
            axes[i, j].set_yscale("log")
            axes[i, j].set_xlabel("episodes per batch")
            axes[i, j].grid(alpha=0.3)
    axes[0, 0].legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64, 256], help="episodes per batch")
    parser.add_argument("--repeats", type=int, default=300, help="independent batches per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for variance.{csv,md,png}")
    args = parser.parse_args(argv)
    if any(n < 2 for n in args.sizes) or args.repeats < 2:
        parser.error("--sizes must be >= 2 (the turn-mean baseline needs another episode) and --repeats >= 2")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    command = "python benchmarks/variance.py " + " ".join(
        [f"--sizes {' '.join(map(str, args.sizes))}", f"--repeats {args.repeats}", f"--seed {args.seed}"]
    )
    rows = run(args.sizes, args.repeats, args.seed)
    atomic_write_csv(args.out / "variance.csv", rows)
    print(write_markdown(rows, args.out / "variance.md", command))
    plot(rows, args.out / "variance.png")
    print(f"wrote {args.out / 'variance.csv'}, variance.md, variance.png")


if __name__ == "__main__":
    main()
