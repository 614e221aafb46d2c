"""serve_vs_vllm.py's streamed requests: time to the first content token and to the whole reply.

Apart from benchmarks/serve_vs_vllm.py so that each stays short. Each request is sent with
``stream=True`` (and ``stream_options.include_usage``, for the reply's length in tokens) through
the ``openai`` package's ``AsyncOpenAI``, like the non-streamed load; both times run from the
moment the request is sent, at the client. Neither ``min_tokens`` nor ``ignore_eos`` is accepted by
``ppg serve`` (its request schema forbids unknown fields), so a reply ends at the policy's end of
turn or at ``max_tokens``, whichever comes first: the same greedy tokens from both servers, and
the mean reply length is reported beside the times.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from serve_latency import percentile

PATHS = ("ppg", "vllm")  # the servers that stream; vLLM's is the baseline
# one sample per request: (seconds to the first content token, seconds to the end, reply tokens)
Sample = tuple[float, float, int]


async def stream_clients(
    base_url: str, messages, concurrency: int, max_tokens: int
) -> tuple[list[Sample], float]:
    """``concurrency`` openai clients streaming ``messages`` from one queue; (samples, wall seconds).
    A reply without any content counts its whole time as its time to the first token."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    queue: asyncio.Queue = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)
    samples: list[Sample] = []

    async def one_client() -> None:
        while not queue.empty():
            m = queue.get_nowait()
            t = time.perf_counter()
            first, tokens = None, 0
            stream = await client.chat.completions.create(
                model="ppg-policy",
                messages=m,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            whole = time.perf_counter() - t
            samples.append((whole if first is None else first, whole, tokens))

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    await client.close()
    return samples, seconds


def stream_rows(samples: dict[tuple[str, int], list[Sample]]) -> list[dict]:
    """One row per (server, clients), sorted like the non-streamed table, with the ratios."""
    rows = []
    for (path, clients), s in sorted(samples.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        first = [x[0] for x in s]
        rows.append(
            {
                "clients": clients,
                "path": path,
                "requests": len(s),
                "ttft_p50_ms": 1000 * statistics.median(first),
                "ttft_p99_ms": 1000 * percentile(first, 99),
                "reply_p50_ms": 1000 * statistics.median(x[1] for x in s),
                "reply_tokens": statistics.mean(x[2] for x in s),
            }
        )
    add_stream_ratios(rows)
    return rows


def add_stream_ratios(rows: list[dict]) -> None:
    """Each streamed row against vLLM's server at the same number of clients (value / baseline)."""
    for r in rows:
        ref = next(d for d in rows if d["clients"] == r["clients"] and d["path"] == "vllm")
        for key in ("ttft_p50_ms", "ttft_p99_ms", "reply_p50_ms"):
            r[key.removesuffix("_ms") + "_vs_vllm"] = r[key] / ref[key]


def stream_markdown(rows: list[dict], max_tokens: int) -> str:
    lines = [
        f"Streamed (`stream=True`, `max_tokens` {max_tokens}, greedy; a reply ends at the policy's end of "
        "turn or at `max_tokens`): time to the first content token (TTFT) and to the whole reply, from the "
        "moment the request is sent; ratios against vLLM's server at the same load.",
        "",
        "| clients | path | requests | TTFT p50 (ms) | TTFT p99 (ms) | whole reply p50 (ms) | reply tokens (mean) "
        "| TTFT p50 vs vLLM server | TTFT p99 vs vLLM server | whole reply p50 vs vLLM server |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['path']} | {r['requests']} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} "
            f"| {r['reply_p50_ms']:.0f} | {r['reply_tokens']:.1f} | {r['ttft_p50_vs_vllm']:.2f}x "
            f"| {r['ttft_p99_vs_vllm']:.2f}x | {r['reply_p50_vs_vllm']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot_ttft(ax, rows: list[dict]) -> None:
    """TTFT p50 as bars, p99 as a black tick above each, the whole reply's p50 as an outline."""
    loads = sorted({r["clients"] for r in rows})
    for j, p in enumerate(PATHS):
        got = [next((r for r in rows if r["path"] == p and r["clients"] == c), None) for c in loads]
        xs = [i + (j - 0.5) * 0.35 for i in range(len(loads))]
        ttft = [r["ttft_p50_ms"] if r else 0 for r in got]
        ax.bar(xs, [r["reply_p50_ms"] if r else 0 for r in got], 0.35, fill=False, edgecolor=f"C{j}", ls="--")
        ax.bar(xs, ttft, 0.35, color=f"C{j}", label=f"{p} TTFT p50")
        p99 = [r["ttft_p99_ms"] if r else 0 for r in got]
        ax.scatter(xs, p99, marker="_", s=200, color="k", zorder=3)
        for x, lo, hi in zip(xs, ttft, p99, strict=True):
            ax.annotate(
                f"{lo:.0f}/{hi:.0f}",
                (x, hi),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize=7,
            )
    ax.set_xticks(range(len(loads)), [f"{c} client(s)" for c in loads])
    ax.set_title("streamed: TTFT p50 (bars) / p99 (ticks),\nwhole reply p50 (dashed), ms")
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="lower right")
