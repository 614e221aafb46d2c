"""Scaling map: how ppg's costs move with model size, each as a ratio to a baseline measured beside it.

At ~1M parameters every engine and learner measures its fixed per-step overhead, not the model (see
BENCHMARKS.md: vLLM beats transformers only at batch 32 there). This benchmark repeats four
comparisons at three sizes of the embedded Llama, to show where that changes:

  generation  tokens/s of the vLLM engine vs transformers generate (rollout.py's ``throughput``), per
              batch size, exactly --max-tokens new tokens per prompt (ignore_eos: equal lengths, and a
              randomly initialised model would never stop anyway)
  learner     one ppg learner update (collate, the objective's advantages, PolicyLearner.step: loss,
              backward, clip, AdamW) on a batch of synthetic single-turn episodes, vs a plain
              transformers forward/backward (cross-entropy on the same agent tokens), clip and AdamW step
              on the same padded batch: ppg's overhead over the bare arithmetic
  weights     vLLM's in-place reload from a state dict (and transformers' load_state_dict) vs a plain
              in-memory copy of the state dict (rollout.py's ``weight_cases``)
  episodes    training episodes/s of ``ppg train`` vs TRL's GRPOTrainer on the same single-turn problem
              (trl_compare.py's ``run``, short budget, one side after the other)

Sizes: ``1m`` is the embedded model itself (SFT warm start); ``10m`` and ``50m`` are randomly
initialised Llamas with the embedded tokenizer, built once into $PPG_CACHE_DIR/scaling/<size> (default
~/.cache/ppg/scaling). Within a size the cases of a comparison are timed in turn, one call each per
round after a warm-up, so a change in machine load hits all of them alike; the 1-minute load average
is recorded per row. Every figure is a ratio against its baseline from the same run; a section left
out or failed is written as "not measured (why)", never dropped. The episodes section runs first,
for every size: Ray must start before any vLLM engine in this process (see rollout.py).

The table and figure are drawn by scaling_report.py; each size's full ppg vs TRL report goes beside
them as scaling_trl_<size>.md.

    python benchmarks/scaling.py                        # writes benchmarks/results/scaling.{csv,md,png}
    python benchmarks/scaling.py --sizes 1m --trl-budget-s 20       # quicker
"""

from __future__ import annotations

import os

# Ray reads this once, at import: a local node then uses 127.0.0.1 and listens on loopback only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ppg.files import atomic_write_csv  # noqa: E402
from ppg.models.tiny import TinyModelSpec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES: dict[str, TinyModelSpec | None] = {
    "1m": None,  # the embedded model: hidden 128, 4 layers
    "10m": TinyModelSpec(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024),
    "50m": TinyModelSpec(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, intermediate_size=2048),
}
SECTIONS = ("generation", "learner", "weights", "episodes")
PLAIN_STEP, PPG_STEP = "plain forward/backward + AdamW", "ppg learner update"
CLONE = "state dict clone (in memory)"
WEIGHT_CASES = (CLONE, "transformers load_state_dict (in memory)", "vllm update_weights (state dict)")
TRL_SIDE, PPG_SIDE = "TRL GRPOTrainer", "ppg train"
CASES = {"learner": [PLAIN_STEP, PPG_STEP], "weights": list(WEIGHT_CASES), "episodes": [TRL_SIDE, PPG_SIDE]}
TRL_ARGS = "--calibration-iterations 3 --eval-episodes 8"  # short: a speed comparison, not a study
FIELDS = [  # ratio: value / the baseline's value, same model and run
    "model", "parameters", "section", "case", "value", "unit", "min", "max", "repeats", "baseline", "ratio",
    "tokens_per_prompt", "torch_threads", "load_1min", "note",
]  # fmt: skip


def sibling(name: str):
    """Another benchmark script of this folder as a module (benchmarks/ is no package)."""
    key = f"ppg_benchmark_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


# --- models --------------------------------------------------------------------------------------


def model_folder(size: str) -> Path:
    """The HF folder of ``size``: the embedded model, or a random-init model with its tokenizer, built
    once (atomically, under a file lock) and rebuilt only when the spec or the tokenizer changed."""
    from filelock import FileLock
    from transformers import AutoTokenizer

    from ppg.models import resolve_model
    from ppg.models.registry import BUILD_INFO
    from ppg.models.tiny import init_model, num_parameters, save_model_folder

    embedded = Path(resolve_model("embedded:tiny"))
    spec = SIZES[size]
    if spec is None:
        return embedded
    info = {"spec": spec.model_dump(), "tokenizer_from": embedded.name}
    target = Path(os.environ.get("PPG_CACHE_DIR", "~/.cache/ppg")).expanduser() / "scaling" / size
    target.parent.mkdir(parents=True, exist_ok=True)

    def built() -> bool:
        try:
            saved = json.loads((target / BUILD_INFO).read_text())
        except (OSError, ValueError):
            return False
        return {k: saved.get(k) for k in info} == info and (target / "model.safetensors").is_file()

    with FileLock(str(target) + ".lock"):
        if not built():
            print(f"[scaling] building the {size} model into {target}", flush=True)
            tokenizer = AutoTokenizer.from_pretrained(embedded)
            model = init_model(spec, tokenizer)
            info["num_parameters"] = num_parameters(model)
            save_model_folder(model, tokenizer, target, {BUILD_INFO: json.dumps(info, indent=2) + "\n"})
    return target


def parameter_count(folder: Path) -> int:
    from ppg.weights import tensor_shapes

    return sum(math.prod(shape) for shape in tensor_shapes(folder).values())


# --- rows ----------------------------------------------------------------------------------------


def blank(model: str, parameters: int, section: str, case: str, **values) -> dict:
    r = {f: "" for f in FIELDS}
    r.update(model=model, parameters=parameters, section=section, case=case, **values)
    return r


def from_rollout(r: dict, model: str, parameters: int, section: str) -> dict:
    """A row of rollout.py's ``row`` (its own fields) as one of this table's."""
    keep = ("value", "unit", "min", "max", "repeats", "tokens_per_prompt", "torch_threads", "load_1min")
    return blank(model, parameters, section, r["case"], **{k: r[k] for k in keep})


def cases_of(section: str, args) -> list[str]:
    """Every case a section measures, baselines first (the rows a skipped section still gets)."""
    if section == "generation":
        return [f"{e} batch={b}" for b in args.batch_sizes for e in ("transformers", "vllm")]
    return CASES[section]


def baseline_of(section: str, case: str) -> str | None:
    base = f"transformers batch={case.rpartition('=')[2]}" if section == "generation" else CASES[section][0]
    return None if base == case else base


def not_measured(model: str, parameters: int, section: str, args, why: str) -> list[dict]:
    note = f"not measured ({why})"
    return [blank(model, parameters, section, c, note=note) for c in cases_of(section, args)]


def add_ratios(rows: list[dict]) -> list[dict]:
    """ratio = value / the baseline's value (rates: speed-up; seconds: times as long as the baseline)."""
    values = {(r["model"], r["case"]): r["value"] for r in rows}
    for r in rows:
        base = baseline_of(r["section"], r["case"])
        if base is not None:
            r["baseline"] = base
            if r["value"] != "" and values.get((r["model"], base), "") != "":
                r["ratio"] = r["value"] / values[(r["model"], base)]
    return rows


# --- the sections --------------------------------------------------------------------------------


def synthetic_episodes(tokenizer, n: int, reply_tokens: int, group_size: int, seed: int):
    """``n`` single-turn episodes: a real chat prompt of the warm-start corpus (shared by a group, as in
    ppg's batches), ``reply_tokens`` random ids as the agent's reply, a random reward. A step's time
    depends on the shapes only, not on what the tokens say."""
    from ppg.episode import Episode

    g = torch.Generator().manual_seed(seed)
    prompts = sibling("rollout").chat_prompts(tokenizer, math.ceil(n / group_size), seed)
    episodes = []
    for i in range(n):
        prompt = prompts[i // group_size]
        reply = torch.randint(len(tokenizer), (reply_tokens,), generator=g).tolist()
        episodes.append(
            Episode(
                problem="scaling",
                persona_id=f"p{i // group_size}",
                group_id=i // group_size,
                policy_version=0,
                messages=[],
                rewards=[float(torch.rand((), generator=g))],
                segment_ids=[0],
                token_ids=prompt + reply,
                agent_mask=[False] * len(prompt) + [True] * reply_tokens,
                token_turn=[0] * (len(prompt) + reply_tokens),
            )
        )
    return episodes


def learner_cases(folder: Path, episodes: list) -> dict:
    """The two steps, each on its own copy of the model and optimizer (ppg's default learner config)."""
    from transformers import AutoModelForCausalLM

    from ppg.config import load_config
    from ppg.episode import collate
    from ppg.learner.update import PolicyLearner, global_advantages

    config = load_config(None, [])
    c = config.learner
    tokens = sum(sum(e.agent_mask) for e in episodes)
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    learner = PolicyLearner(policy, config.objective, c, config.run.iterations)

    def ppg_update():
        advantages = global_advantages(episodes, config.objective)
        return learner.step(collate(episodes), advantages, len(episodes), tokens, version=0)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    batch = collate(episodes)
    labels = batch.token_ids.masked_fill(~(batch.agent_mask & batch.attention_mask), -100)

    def plain_step():
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=batch.token_ids, attention_mask=batch.attention_mask.long(), labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optimizer.step()
        return float(out.loss.detach())

    return {PLAIN_STEP: plain_step, PPG_STEP: ppg_update}


def in_process(model: str, parameters: int, folder: Path, args, sections: set[str], progress) -> list[dict]:
    """Generation, weights and learner of one size, in this process, with 1 torch thread (vLLM keeps
    the count it finds: main() sets it before the first engine)."""
    from ppg.rollout.engine import EngineConfig, HFEngine, SamplingSpec, VLLMEngine, load_state_dict

    rollout = sibling("rollout")
    rows: list[dict] = []
    hf = vllm = None
    try:
        if sections & {"generation", "weights"}:
            progress.set_postfix_str(f"{model}: starting transformers and vLLM")
            hf = HFEngine(folder, EngineConfig(seed=args.seed))
            vllm = VLLMEngine(folder, EngineConfig(seed=args.seed))
        if "generation" in sections:
            progress.set_postfix_str(f"{model}: generate")
            prompts = rollout.chat_prompts(hf.tokenizer, max(args.batch_sizes), args.seed)
            sampling = SamplingSpec(args.max_tokens, args.temperature, ignore_eos=True)
            engines = {"transformers": hf, "vllm": vllm}
            measured = rollout.throughput(
                engines, prompts, args.batch_sizes, sampling, args.repeats, progress
            )
            rows += [from_rollout(r, model, parameters, "generation") for r in measured]
        if "weights" in sections:
            progress.set_postfix_str(f"{model}: weight updates")
            state = load_state_dict(folder)
            cases = rollout.weight_cases(state, folder, hf, vllm)
            timed = rollout.interleaved({k: cases[k] for k in WEIGHT_CASES}, args.weight_repeats, progress)
            for name, runs in timed.items():
                r = rollout.row("weights", name, 1, [s for s, _ in runs], "s")
                rows.append(from_rollout(r, model, parameters, "weights"))
            del state
    finally:
        del hf, vllm
        gc.collect()
    if "learner" in sections:
        from transformers import AutoTokenizer

        progress.set_postfix_str(f"{model}: learner steps on {args.learner_episodes} episodes")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        episodes = synthetic_episodes(tokenizer, args.learner_episodes, args.max_tokens, 4, args.seed)
        timed = rollout.interleaved(learner_cases(folder, episodes), args.learner_repeats, progress)
        n = sum(len(e.token_ids) for e in episodes) / len(episodes)
        note = f"{len(episodes)} episodes of {n:.0f} tokens on average"
        for name, runs in timed.items():
            r = rollout.row("learner", name, len(episodes), [s for s, _ in runs], "s")
            rows.append(from_rollout(r, model, parameters, "learner") | {"note": note})
        gc.collect()
    return rows


def ppg_vs_trl(model: str, parameters: int, folder: Path, args) -> list[dict]:
    """trl_compare.py's two training runs on this size's model; its own report goes beside ours."""
    trl = sibling("trl_compare")
    targs = trl.parse_args(
        [
            *("--model", str(folder), "--budget-s", f"{args.trl_budget_s:g}", "--poll-variant-s", "0"),
            *("--max-tokens", str(args.max_tokens), "--temperature", f"{args.temperature:g}"),
            *("--torch-threads", str(args.torch_threads), "--seed", str(args.seed)),
            *shlex.split(args.trl_args),
        ]
    )
    load_before, start = os.getloadavg(), time.perf_counter()
    rows = trl.run(targs)
    machine = trl.machine_line(load_before, time.perf_counter() - start)
    command = f"{trl.command_line(targs)} --model {folder}"
    trl.write_markdown(rows, args.out / f"scaling_trl_{model}.md", command, machine, targs)
    summary = {r["side"]: r for r in rows if r["kind"] == "summary"}
    trl_best = max((s for k, s in summary.items() if k.startswith("trl")), key=lambda s: s["episodes_per_s"])
    out = []
    for case, s in ((TRL_SIDE, trl_best), (PPG_SIDE, summary["ppg"])):
        note = (
            f"{s['updates']} updates of {targs.episodes_per_update} episodes in {s['train_s']:.1f} s; "
            f"{s['eval_sampled_tokens']:.1f} reply tokens (held-out, sampled)"
        )
        threads = s["torch_threads"]
        out.append(
            blank(model, parameters, "episodes", case, value=s["episodes_per_s"], unit="episodes/s")
            | {"repeats": s["updates"], "torch_threads": threads, "load_1min": s["load_mean"], "note": note}
        )
    return out


# --- the run -------------------------------------------------------------------------------------


def run(args) -> list[dict]:
    sections = set(args.sections)
    folders = {size: model_folder(size) for size in args.sizes}
    params = {size: parameter_count(f) for size, f in folders.items()}
    for size in args.sizes:
        print(f"[scaling] {size}: {params[size]:,} parameters ({folders[size]})", flush=True)
    rows: list[dict] = []
    for section in SECTIONS:
        if section not in sections:
            for size in args.sizes:
                rows += not_measured(size, params[size], section, args, "--sections leaves it out")
    phases = [("episodes", s) for s in args.sizes if "episodes" in sections]
    phases += [("in-process", s) for s in args.sizes if sections - {"episodes"}]
    start = time.perf_counter()

    def log(k: int, phase: str, size: str) -> None:
        elapsed = time.perf_counter() - start
        eta = f", ~{elapsed / k * (len(phases) - k):.0f} s left" if k else ""
        tqdm.write(f"[scaling] step {k + 1}/{len(phases)}: {phase} at {size} ({elapsed:.0f} s{eta})")

    def attempt(size: str, names: list[str], measure) -> list[dict]:
        try:
            return measure()
        except Exception as e:  # a long map keeps going; the table says what failed
            traceback.print_exc()
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            return [r for n in names for r in not_measured(size, params[size], n, args, why)]

    k = 0
    if "episodes" in sections:  # first: Ray before any vLLM engine in this process
        import ray

        from ppg.ray_session import connect

        started = not ray.is_initialized()
        connect()
        try:
            for size in args.sizes:
                log(k, "ppg vs TRL", size)
                rows += attempt(size, ["episodes"], lambda s=size: ppg_vs_trl(s, params[s], folders[s], args))
                k += 1
        finally:
            if started:
                ray.shutdown()
    inner = sections - {"episodes"}
    if inner:
        calls = {"generation": 2 * len(args.batch_sizes) * args.repeats, "learner": 2 * args.learner_repeats}
        calls["weights"] = len(WEIGHT_CASES) * args.weight_repeats
        total = sum(calls[s] for s in inner) * len(args.sizes)
        progress = tqdm(total=total, desc="scaling, in process", unit="call")
        for size in args.sizes:
            log(k, "generation, weights, learner", size)
            names = [s for s in SECTIONS if s in inner]
            rows += attempt(
                size, names, lambda s=size: in_process(s, params[s], folders[s], args, inner, progress)
            )
            k += 1
        progress.close()
    order = {s: i for i, s in enumerate(args.sizes)}
    rows.sort(key=lambda r: (SECTIONS.index(r["section"]), order[r["model"]]))  # stable within
    return add_ratios(rows)


# --- output (tables and the figure: scaling_report.py) ------------------------------------------


def machine_line(load_before: tuple[float, ...], seconds: float) -> str:
    try:  # versions of every library involved, when TRL is installed (the dev extra)
        return sibling("trl_compare").machine_line(load_before, seconds)
    except ImportError:
        return sibling("rollout").machine_line(load_before, seconds)


def command_line(args) -> str:
    """Every option's value but --out: the command that repeats this run."""

    def value(k, v) -> str:
        if isinstance(v, list):
            return ("," if k == "sizes" else " ").join(map(str, v))
        return f"{v:g}" if isinstance(v, float) else shlex.quote(str(v))

    parts = [f"--{k.replace('_', '-')} {value(k, v)}" for k, v in vars(args).items() if k != "out"]
    return "python benchmarks/scaling.py " + " ".join(parts)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--sizes", type=lambda v: v.split(","), default=list(SIZES), help=f"comma-separated, of {list(SIZES)}"
    )
    add("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    add("--batch-sizes", type=int, nargs="+", default=[8, 32], help="prompts per generate call")
    add("--max-tokens", type=int, default=32, help="new tokens per reply (generation, learner, TRL)")
    add("--temperature", type=float, default=1.0)
    add("--repeats", type=int, default=3, help="timed generate calls per engine and batch size")
    add("--weight-repeats", type=int, default=5, help="timed weight updates per case")
    add("--learner-episodes", type=int, default=32, help="episodes per learner step")
    add("--learner-repeats", type=int, default=3, help="timed learner steps per case")
    add("--trl-budget-s", type=float, default=40.0, help="training-loop seconds per side and size")
    add("--trl-args", default=TRL_ARGS, help="more options of trl_compare.py, for the episodes section")
    add("--torch-threads", type=int, default=1, help="torch threads here (set before vLLM starts)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=RESULTS, help="folder for scaling.{csv,md,png}")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown or not args.sizes:
        parser.error(f"--sizes: unknown {unknown}; choose from {list(SIZES)}")
    if min(args.batch_sizes) < 1 or args.max_tokens < 1 or args.learner_episodes < 1:
        parser.error("--batch-sizes, --max-tokens and --learner-episodes must be >= 1")
    if min(args.repeats, args.weight_repeats, args.learner_repeats) < 1 or args.trl_budget_s <= 0:
        parser.error("the repeat counts must be >= 1 and --trl-budget-s > 0")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.torch_threads)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    command = command_line(args)
    load_before, start = os.getloadavg(), time.perf_counter()
    rows = run(args)
    machine = machine_line(load_before, time.perf_counter() - start)
    atomic_write_csv(args.out / "scaling.csv", rows, FIELDS)
    report = sibling("scaling_report")
    print(report.write_markdown(rows, args.out / "scaling.md", command, machine, args.batch_sizes))
    report.plot(rows, args.out / "scaling.png")
    print(f"wrote {args.out / 'scaling.csv'}, scaling.md, scaling.png")
    return rows


if __name__ == "__main__":
    main()
