"""ppg's learner update against a plain transformers step, on real model shapes (issue 18 item 5).

For a machine with a GPU (the ``device`` tool's image has torch and transformers, no Ray or vLLM):
randomly initialised Qwen2.5-0.5B- and 1.5B-shaped models (Llama-style decoder, GQA, tied
embeddings; built from their published shapes, nothing downloaded), in bf16 autocast as
``learner.precision=bf16`` runs them, with each memory option of the learner (none, gradient
checkpointing, micro-batches, LoRA). Per case, one update of the same padded batch of synthetic
single-turn episodes, two ways, timed in turn after a warm-up:

  plain  transformers forward with labels (cross-entropy on the agent tokens), backward, clip,
         AdamW step: the bare arithmetic
  ppg    the code path ``ppg/learner/update.py`` runs in a learner worker: the objective's
         advantages, ``PolicyLearner.step`` (token log-probs, the policy-gradient loss, backward per
         micro-batch, clip, AdamW, the schedule)

and reports ppg's time as a ratio to plain's (its overhead) and each one's peak GPU memory
(``torch.cuda.max_memory_allocated``). On CPU it runs too (``--device cpu --shapes tiny``: how the
test checks it), without memory figures.

    python benchmarks/learner_device.py                                  # cuda, 0.5b and 1.5b
    python benchmarks/learner_device.py --device cpu --shapes tiny --steps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ppg, without installing it
from ppg.files import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Qwen2.5's published shapes (config.json of Qwen/Qwen2.5-0.5B and -1.5B); "tiny" for CPU checks.
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}  # fmt: skip
OPTIONS = {  # learner.* overrides of each memory option
    "none": [],
    "gradient checkpointing": ["learner.gradient_checkpointing=true"],
    "micro-batches of 8": ["learner.micro_batch_size=8"],
    "lora r=16": ["learner.lora={rank: 16, alpha: 32}"],
}


def build_model(shape: str, device: str, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096)
    return Qwen2ForCausalLM(config).to(device)


def episodes(vocab: int, n: int, prompt_tokens: int, reply_tokens: int, seed: int):
    from ppg.episode import Episode

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(vocab, (prompt_tokens + reply_tokens,), generator=g).tolist()
        out.append(
            Episode(
                problem="bench", persona_id=f"p{i // 4}", group_id=i // 4, policy_version=0,
                messages=[], rewards=[float(torch.rand((), generator=g))], segment_ids=[0],
                token_ids=ids, agent_mask=[False] * prompt_tokens + [True] * reply_tokens,
                token_turn=[0] * len(ids),
            )
        )  # fmt: skip
    return out


def configure(model, config):
    """The model as ppg's learner worker builds it (``ppg/learner/loop.py``: build_learner)."""
    from ppg.learner.lora import apply_lora

    if config.learner.lora is not None:
        model = apply_lora(model, config.learner.lora)
    if config.learner.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def cases(args, shape: str, option: str) -> dict:
    from ppg.config import load_config
    from ppg.episode import collate
    from ppg.learner.update import PolicyLearner, global_advantages

    use_gpu = "true" if args.device == "cuda" else "false"
    overrides = [f"learner.precision={args.precision}", f"learner.use_gpu={use_gpu}", *OPTIONS[option]]
    config = load_config(None, overrides)
    c = config.learner
    batch_eps = episodes(SHAPES[shape]["vocab_size"], args.episodes, args.prompt_tokens, args.reply_tokens, 0)
    tokens = sum(sum(e.agent_mask) for e in batch_eps)
    batch = collate(batch_eps)
    autocast = dict(device_type=args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    learner = PolicyLearner(configure(build_model(shape, args.device, 0), config), config.objective, c, 100)

    def ppg_update():
        advantages = global_advantages(batch_eps, config.objective)
        return learner.step(collate(batch_eps), advantages, len(batch_eps), tokens, version=0).loss

    model = configure(build_model(shape, args.device, 0), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c.lr)
    on_device = batch.to(args.device)
    labels = on_device.token_ids.masked_fill(~(on_device.agent_mask & on_device.attention_mask), -100)
    size = c.micro_batch_size or args.episodes

    def plain_step():
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, args.episodes, size):
            rows = slice(i, i + size)
            with torch.autocast(**autocast):
                out = model(
                    input_ids=on_device.token_ids[rows],
                    attention_mask=on_device.attention_mask[rows].long(),
                    labels=labels[rows],
                )
            loss = out.loss * (min(size, args.episodes - i) / args.episodes)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optimizer.step()
        return total

    return {"plain": (plain_step, model), "ppg": (ppg_update, learner.model)}


def timed(step, device: str, steps: int) -> tuple[list[float], float | None, float]:
    """Seconds per call (after one warm-up call), peak memory in GiB (cuda), the last loss."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    loss = step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        sync()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return seconds, peak, float(loss)


def run(args) -> list[dict]:
    rows = []
    for shape in args.shapes:
        for option in args.options:
            row = {"shape": shape, "option": option, "episodes": args.episodes, "precision": args.precision}
            try:
                built = cases(args, shape, option)
            except ImportError as e:  # peft for LoRA: recorded, never dropped
                rows.append(row | {"not_measured": f"{type(e).__name__}: {e}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            for name, (step, model) in built.items():
                seconds, peak, loss = timed(step, args.device, args.steps)
                row |= {
                    f"{name}_s": statistics.median(seconds),
                    f"{name}_peak_gib": peak,
                    f"{name}_loss": loss,
                }
                row["parameters"] = sum(p.numel() for p in model.parameters())
                del step, model
                built[name] = None  # free this side's model and optimizer before the next
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            row["overhead"] = row["ppg_s"] / row["plain_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], args, device_name: str) -> str:
    def gib(v):
        return "n/a" if v is None else f"{v:.1f}"

    lines = [
        f"`python benchmarks/learner_device.py {' '.join(args.argv)}`; {device_name}; {args.episodes} "
        f"episodes of {args.prompt_tokens} prompt + {args.reply_tokens} reply tokens; precision "
        f"{args.precision}; median of {args.steps} steps after a warm-up",
        "",
        "| shape | parameters | memory option | plain step (s) | ppg update (s) | ppg / plain | "
        "plain peak (GiB) | ppg peak (GiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "not_measured" in r:
            lines.append(f"| {r['shape']} | | {r['option']} | not measured ({r['not_measured']}) | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['parameters'] / 1e6:,.1f}M | {r['option']} | {r['plain_s']:.3f} | "
            f"{r['ppg_s']:.3f} | {r['overhead']:.2f}x | {gib(r['plain_peak_gib'])} | {gib(r['ppg_peak_gib'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["0.5b", "1.5b"])
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: no CUDA device here (use --device cpu --shapes tiny to check the script)"
        )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, args, device_name)
    atomic_write_text(args.out / "learner_device.md", text)
    atomic_write_text(
        args.out / "learner_device.json", json.dumps({"device": device_name, "rows": rows}, indent=1)
    )
    print(text)
    return rows


if __name__ == "__main__":
    main()
