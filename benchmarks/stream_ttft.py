"""Streaming: time to the first token vs time to the whole reply, through ``ppg serve`` over HTTP.

One replica on 127.0.0.1 serves the tiny model with noise on its weights (greedy replies run to
``--max-tokens`` instead of ending the turn after ~20 tokens); each request streams ``--max-tokens``
greedy tokens, one at a time (no concurrency). Reported per request: the first content chunk's
arrival and the whole reply's, both from the moment the request was sent (medians over
``--requests``). With incremental streaming the first is one engine step after the prefill; a server
that generated the reply before streaming it would show them nearly equal.

    python benchmarks/stream_ttft.py                 # 64 tokens, 10 requests
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when Ray is imported: loopback only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402

PROMPT = [
    {"role": "system", "content": "You are talking with Ana, who loves jazz and hates crowds."},
    {"role": "user", "content": "hello, can you recommend something?"},
]


def talkative_policy(folder: Path, scale: float = 2.0) -> Path:
    """The tiny model's files with noise on every weight: its greedy text does not end its turn."""
    import torch
    from safetensors.torch import save_file

    from ppg.models import resolve_model
    from ppg.rollout.engine import load_state_dict

    source = resolve_model("embedded:tiny")
    shutil.copytree(source, folder)
    g = torch.Generator().manual_seed(0)
    noisy = {
        k: (v + scale * v.std() * torch.randn(v.shape, generator=g)).contiguous()
        for k, v in load_state_dict(source).items()
    }
    save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def stream_once(base: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first content chunk, seconds to [DONE], content chunks)."""
    body = {
        "model": "ppg-policy",
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start, first, chunks = time.perf_counter(), None, 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                chunks += 1
                first = first if first is not None else time.perf_counter() - start
    return first, time.perf_counter() - start, chunks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import ray

    from ppg.serve.service import start_server, stop_server
    from ppg.serve.settings import ServeSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="ppg-ttft-"))
    settings = ServeSettings(
        checkpoint=str(talkative_policy(work / "policy")),
        app_name="ppg-ttft",
        port=port,
        max_tokens_limit=args.max_tokens,
        max_model_len=256,
    )
    started_ray = not ray.is_initialized()
    start_server(settings)
    base = f"http://127.0.0.1:{port}"
    try:
        stream_once(base, args.max_tokens)  # warm-up
        runs = [stream_once(base, args.max_tokens) for _ in range(args.requests)]
    finally:
        stop_server(settings.app_name)
        shutil.rmtree(work, ignore_errors=True)
        if started_ray:
            ray.shutdown()
    result = {
        "max_tokens": args.max_tokens,
        "requests": args.requests,
        "first_token_ms": round(statistics.median(r[0] for r in runs) * 1000),
        "whole_reply_ms": round(statistics.median(r[1] for r in runs) * 1000),
        "content_chunks": statistics.median(r[2] for r in runs),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
