"""ppg serve vs vLLM's own OpenAI server, side by side in one run (issue 18 item 3).

Same checkpoint (the embedded tiny policy), same chat prompts, same client (the ``openai`` package,
``AsyncOpenAI``), greedy, ``max_tokens`` 16, on 127.0.0.1:

  ppg    ``ppg serve``'s app: HAProxy (``--ingress haproxy``, serve.ingress's default) or Ray Serve's
         proxy and router (``--ingress proxy``) -> one replica (1 CPU) whose engine loop
         steps an in-process ``vllm.LLM`` (continuous batching, ``serve.max_batch_size`` 32)
  vllm   ``python -m vllm.entrypoints.openai.api_server`` in a subprocess (its own API process and
         engine-core process), one OpenMP thread like the replica
  echo   a Ray Serve deployment that answers a fixed completion without any engine: Ray Serve's own
         overhead (ingress, replica call, HTTP), measured apart, through the same ingress
  direct ``vllm.LLM.generate`` in this process on the same prompts, 32 at once: the engine alone

Streamed too (unless ``--no-stream``): the same prompts with ``stream=True`` and ``--stream-max-tokens``
(32) to ppg and vllm, in the same rounds, for the time to the first content token (p50, p99) and to
the whole reply (p50); see benchmarks/serve_vs_vllm_stream.py. ppg serve takes neither ``min_tokens``
nor ``ignore_eos``, so replies end at the policy's end of turn (the tiny policy's greedy replies to
these prompts: ~7 tokens) or at max_tokens; the table gives their mean length.

Loads: 1 client (requests one after another) and 32 concurrent clients. The servers are measured in
alternating rounds so a change in machine load hits all alike; ratios are against vLLM's server
in the same run. The machine's load average is recorded before and after.

    python benchmarks/serve_vs_vllm.py                 # ~4 min on 2 cores
    python benchmarks/serve_vs_vllm.py --ingress proxy     # through Ray Serve's Python proxy
    python benchmarks/serve_vs_vllm.py --requests 64 --rounds 1 --no-stream      # quicker
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when Ray is imported: loopback only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import chat_messages, free_port, percentile  # noqa: E402
from serve_vs_vllm_stream import plot_ttft, stream_clients, stream_markdown, stream_rows  # noqa: E402

from ppg.files import atomic_save_figure, atomic_write_text  # noqa: E402

ECHO = {
    "id": "echo",
    "object": "chat.completion",
    "created": 0,
    "model": "ppg-policy",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def start_echo(port: int) -> None:
    """A Ray Serve app with no engine: what Serve itself costs per request."""
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
    class Echo:
        async def __call__(self, request):
            await request.body()
            return JSONResponse(ECHO)

    serve.run(Echo.bind(), name="echo", route_prefix="/echo")


def start_vllm_server(policy: str, port: int, max_model_len: int, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",  # one thread, like the 1-CPU replica
        "VLLM_CACHE_ROOT": str(Path(tempfile.gettempdir()) / f"ppg-vllm-cache-{os.getuid()}"),
        "LD_PRELOAD": "",
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", policy, "--served-model-name", "ppg-policy",
        "--max-model-len", str(max_model_len), "--enforce-eager", "--max-num-seqs", "32",
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}) before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1.0)
    raise TimeoutError(url)


async def clients(base_url: str, messages, concurrency: int, max_tokens: int) -> tuple[list[float], float]:
    """``concurrency`` openai clients taking ``messages`` from one queue; (latencies, wall seconds)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    queue: asyncio.Queue = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)
    latencies: list[float] = []

    async def one_client() -> None:
        while not queue.empty():
            m = queue.get_nowait()
            t = time.perf_counter()
            await client.chat.completions.create(
                model="ppg-policy", messages=m, max_tokens=max_tokens, temperature=0
            )
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    await client.close()
    return latencies, seconds


def run(args) -> tuple[list[dict], list[dict], dict]:
    import ray

    from ppg.models import resolve_model
    from ppg.ray_session import connect
    from ppg.serve.service import start_server, stop_server
    from ppg.serve.settings import ServeSettings

    policy = str(resolve_model(args.model))
    load_before = os.getloadavg()
    started_ray = not ray.is_initialized()  # a caller's Ray (a test's) is left running
    if started_ray:
        connect(num_cpus=4, serve_ingress=args.ingress)
    ingress = "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy"
    vllm_port = free_port()
    log = Path(tempfile.mkdtemp(prefix="serve-vs-vllm-")) / "vllm_server.log"
    vllm_server = start_vllm_server(policy, vllm_port, args.max_model_len, log)
    settings = ServeSettings(
        checkpoint=policy,
        app_name="ppg-bench",
        port=free_port(),
        max_model_len=args.max_model_len,
        max_tokens_limit=max(args.max_tokens, args.stream_max_tokens, 1),
        max_batch_size=args.concurrency,
        ingress=args.ingress,
    )
    samples: dict[tuple[str, int], tuple[list[float], float]] = {}
    streamed: dict[tuple[str, int], list] = {}  # (server, clients) -> serve_vs_vllm_stream.Sample
    stream = [] if args.no_stream else ["ppg stream", "vllm stream"]
    echo = False
    try:
        start_server(settings)  # before the in-process engine, whose LD_PRELOAD would leak to Ray workers
        start_echo(settings.port)
        echo = True
        wait_ready(f"http://127.0.0.1:{vllm_port}/v1/models", vllm_server)
        base = {
            "ppg": f"http://127.0.0.1:{settings.port}/v1",
            "vllm": f"http://127.0.0.1:{vllm_port}/v1",
            "echo": f"http://127.0.0.1:{settings.port}/echo/v1",
        }
        from serve_latency import DirectEngine

        engine = DirectEngine(policy, args.max_model_len, args.max_tokens)
        messages = chat_messages(args.requests)
        prompts = [engine.tokenize(m) for m in messages]
        for url in base.values():  # warm every path
            asyncio.run(clients(url, messages[:8], 4, args.max_tokens))
        for path in stream:
            asyncio.run(stream_clients(base[path.split()[0]], messages[:8], 4, args.stream_max_tokens))
        engine.generate(prompts[:8])

        def direct(concurrency: int):
            latencies, start = [], time.perf_counter()
            for i in range(0, len(prompts), concurrency):
                t = time.perf_counter()
                engine.generate(prompts[i : i + concurrency])
                latencies += [time.perf_counter() - t] * len(prompts[i : i + concurrency])
            return latencies, time.perf_counter() - start

        for r in range(args.rounds):
            for concurrency in (1, args.concurrency):
                order = ["ppg", "vllm", "echo", "direct", *stream]
                order = order[r % len(order) :] + order[: r % len(order)]  # who goes first rotates
                for path in order:
                    msgs = messages if concurrency > 1 else messages[: args.sequential_requests]
                    if path in stream:
                        server = path.split()[0]
                        got, seconds = asyncio.run(
                            stream_clients(base[server], msgs, concurrency, args.stream_max_tokens)
                        )
                        streamed[(server, concurrency)] = streamed.get((server, concurrency), []) + got
                        print(f"round {r} {path} x{concurrency}: {len(got) / seconds:.1f} req/s", flush=True)
                        continue
                    if path == "direct":
                        latencies, seconds = direct(concurrency)
                    else:
                        latencies, seconds = asyncio.run(
                            clients(base[path], msgs, concurrency, args.max_tokens)
                        )
                    old = samples.get((path, concurrency), ([], 0.0))
                    samples[(path, concurrency)] = (old[0] + latencies, old[1] + seconds)
                    print(
                        f"round {r} {path} x{concurrency}: {len(latencies) / seconds:.1f} req/s", flush=True
                    )
    finally:
        vllm_server.terminate()
        vllm_server.wait(timeout=60)
        if echo:
            from ray import serve

            serve.delete("echo")  # first: stop_server stops Serve once no app is left
        stop_server(settings.app_name)
        if started_ray:
            ray.shutdown()
    rows = []
    for (path, concurrency), (latencies, seconds) in sorted(
        samples.items(), key=lambda kv: (kv[0][1], kv[0][0])
    ):
        rows.append(
            {
                "clients": concurrency,
                "path": path,
                "requests": len(latencies),
                "p50_ms": 1000 * statistics.median(latencies),
                "p99_ms": 1000 * percentile(latencies, 99),
                "requests_per_s": len(latencies) / seconds,
            }
        )
    add_ratios(rows)
    machine = {
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "ingress": ingress,
    }
    return rows, stream_rows(streamed) if streamed else [], machine


def add_ratios(rows: list[dict]) -> None:
    """Each row against vLLM's server and the direct engine at the same number of clients."""
    for r in rows:
        ref = {d["path"]: d for d in rows if d["clients"] == r["clients"]}
        r["rps_vs_vllm"] = r["requests_per_s"] / ref["vllm"]["requests_per_s"]
        r["p50_vs_vllm"] = r["p50_ms"] / ref["vllm"]["p50_ms"]
        r["rps_vs_direct"] = r["requests_per_s"] / ref["direct"]["requests_per_s"]


def markdown(rows: list[dict], machine: dict, command: str) -> str:
    lines = [
        f"`{command}`; load average before {machine['load_before'][0]:.1f}, after {machine['load_after'][0]:.1f} "
        f"({machine['cpus']} CPUs, shared with other jobs); ppg and echo through "
        f"{machine.get('ingress', 'proxy')} (serve.ingress)",
        "",
        "| clients | path | requests | p50 (ms) | p99 (ms) | requests/s | req/s vs vLLM server | p50 vs vLLM server | req/s vs direct |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['path']} | {r['requests']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['requests_per_s']:.1f} | {r['rps_vs_vllm']:.2f}x | {r['p50_vs_vllm']:.2f}x | {r['rps_vs_direct']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, max_tokens: int, streamed: list[dict], stream_max_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = ["ppg", "vllm", "echo", "direct"]
    loads = sorted({r["clients"] for r in rows})
    fig, axes = plt.subplots(1, 3 if streamed else 2, figsize=(16 if streamed else 11, 4))
    for ax, key, title in (
        (axes[0], "requests_per_s", "requests/s"),
        (axes[1], "p50_ms", "p50 latency (ms)"),
    ):
        for j, p in enumerate(paths):
            vals = [next((r[key] for r in rows if r["path"] == p and r["clients"] == c), 0) for c in loads]
            bars = ax.bar([i + (j - 1.5) * 0.2 for i in range(len(loads))], vals, 0.2, label=p)
            ax.bar_label(bars, [f"{v:.0f}" for v in vals], fontsize=7)
        ax.set_xticks(range(len(loads)), [f"{c} client(s)" for c in loads])
        ax.set_title(title)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    if streamed:
        plot_ttft(axes[2], streamed)
    title = f"ppg serve vs vLLM's OpenAI server (same checkpoint, max_tokens {max_tokens}"
    fig.suptitle(title + (f"; streamed: max_tokens {stream_max_tokens})" if streamed else ")"))
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded:tiny")
    parser.add_argument("--requests", type=int, default=192, help="requests per path and round at 32 clients")
    parser.add_argument(
        "--sequential-requests", type=int, default=48, help="requests per path and round, 1 client"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--stream-max-tokens", type=int, default=32, help="max_tokens of the streamed requests"
    )
    parser.add_argument("--no-stream", action="store_true", help="skip the streamed requests (quicker)")
    parser.add_argument(
        "--ingress",
        choices=["haproxy", "proxy"],
        default="haproxy",
        help="serve.ingress of the Ray cluster this starts (HTTP to ppg and echo through HAProxy or "
        "Ray Serve's proxy); a caller's running Ray keeps its own",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    command = "python benchmarks/serve_vs_vllm.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
        for k, v in vars(args).items()
        if k not in ("out", "model") and v is not False and not (k == "stream_max_tokens" and args.no_stream)
    )
    rows, streamed, machine = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, machine, command)
    if streamed:
        text += "\n" + stream_markdown(streamed, args.stream_max_tokens)
    atomic_write_text(args.out / "serve_vs_vllm.md", text)
    result = {"rows": rows, "stream_rows": streamed, "stream_max_tokens": args.stream_max_tokens}
    atomic_write_text(args.out / "serve_vs_vllm.json", json.dumps({**result, "machine": machine}, indent=1))
    plot(rows, args.out / "serve_vs_vllm.png", args.max_tokens, streamed, args.stream_max_tokens)
    print(text)
    return rows


if __name__ == "__main__":
    main()
