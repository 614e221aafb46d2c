"""Where a ``ppg serve`` replica's CPU goes under load (issue 18 item 3: the serving gap to vLLM's
own server). BENCHMARKS.md measured ppg serve at ~0.45-0.56x of vLLM's server at 32 clients and
Ray Serve's echo at 0.87x; this names the rest: py-spy samples the replica and the Serve proxy
while 32 ``openai`` clients send chat completions, and every sample is charged to the library of
its innermost Python frame (vLLM's engine step, FastAPI/Starlette, pydantic, the chat template,
Ray Serve's machinery, asyncio, ppg's own serve code, ...).

    python benchmarks/serve_profile.py                      # ~2 min on 2 cores
    python benchmarks/serve_profile.py --requests 256 --rate 50

Writes benchmarks/results/serve_profile.{md,json,png}. Samples are wall-clock stacks of threads
that are running (py-spy's default: idle threads are not counted), at ``--rate`` per second; py-spy
itself takes CPU on this 2-core machine, so read shares, not absolute times.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when Ray is imported: loopback only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import chat_messages, free_port  # noqa: E402
from serve_vs_vllm import clients  # noqa: E402

from ppg.files import atomic_save_figure, atomic_write_text  # noqa: E402

# (group, substrings of a frame's file path), first match wins: the innermost frame's library
GROUPS = (
    ("vLLM engine (scheduler, model step, sampling)", ("/vllm/",)),
    ("torch (outside vLLM's frames)", ("/torch/",)),
    ("chat template, tokenizer", ("/transformers/", "/tokenizers/", "/jinja2/")),
    ("pydantic (validation, serialization)", ("/pydantic/", "/pydantic_core/")),
    ("HTTP: FastAPI, Starlette, uvicorn, h11", ("/fastapi/", "/starlette/", "/uvicorn/", "/h11/", "/httptools/")),
    ("Ray Serve (proxy, router, replica)", ("/ray/serve/",)),
    ("Ray core (actor calls, gRPC, object store)", ("/ray/",)),
    ("ppg serve code", ("/ppg/serve/",)),
    ("ppg other", ("/ppg/",)),
    ("asyncio event loop", ("/asyncio/",)),
    ("json", ("/json/", "orjson")),
)  # fmt: skip
OTHER = "other (stdlib, threading, logging, ...)"


def frame_group(frame: str, group_markers=GROUPS) -> str | None:
    """The group of one collapsed-stack frame, ``function (path:line)``; None when no group names it."""
    path = frame[frame.rfind("(") + 1 :] if "(" in frame else frame
    path = path if path.startswith("/") else "/" + path  # py-spy shortens to the import path
    for group, markers in group_markers:
        if any(m in path for m in markers):
            return group
    return None


RAY_CORE = "Ray core (actor calls, gRPC, object store)"


def charge(collapsed: str, group_markers=GROUPS) -> tuple[Counter, Counter, Counter]:
    """Samples per group (by the innermost frame that belongs to a group; else OTHER), per
    innermost function, and, for Ray-core samples, per caller (the innermost frame outside Ray's
    own code: who makes those actor calls), from py-spy's raw (collapsed) output:
    ``frame;frame;... count`` per line, outermost first."""
    groups, leaves, ray_callers = Counter(), Counter(), Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        group = next((g for g in (frame_group(f, group_markers) for f in reversed(frames)) if g), OTHER)
        groups[group] += int(count)
        leaves[frames[-1]] += int(count)
        if group == RAY_CORE:
            caller = next((f for f in reversed(frames) if "ray/" not in f), "(Ray's own threads)")
            ray_callers[caller] += int(count)
    return groups, leaves, ray_callers


def summary(collapsed: str, top: int, group_markers=GROUPS) -> dict:
    """One process's samples as shares: by group, by innermost function, by Ray-core caller."""
    groups, leaves, ray_callers = charge(collapsed, group_markers)
    total = sum(groups.values())
    return {
        "samples": total,
        "groups": {g: n / total for g, n in groups.most_common()},
        "top_functions": [(f, n / total) for f, n in leaves.most_common(top)],
        "ray_core_callers": [(f, n / total) for f, n in ray_callers.most_common(6)],
    }


def process_ids(marker: str) -> list[int]:
    """PIDs whose command line (Ray's process title, e.g. ``ray::ServeReplica:app:deployment``)
    contains ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(int(proc.name))
    return found


def record(pid: int, seconds: float, rate: int, out: Path) -> subprocess.Popen:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
         "--format", "raw", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run(args) -> dict:
    import ray

    from ppg.models import resolve_model
    from ppg.ray_session import connect
    from ppg.serve.service import start_server, stop_server
    from ppg.serve.settings import ServeSettings

    policy = str(resolve_model(args.model))
    started_ray = not ray.is_initialized()
    if started_ray:
        connect(num_cpus=4, serve_ingress=args.ingress)
    settings = ServeSettings(
        checkpoint=policy, app_name="ppg-profile", port=free_port(), max_model_len=512,
        max_tokens_limit=args.max_tokens, max_batch_size=args.concurrency,
    )  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="serve-profile-"))
    try:
        start_server(settings)
        url = f"http://127.0.0.1:{settings.port}/v1"
        messages = chat_messages(args.requests)
        asyncio.run(clients(url, messages[:16], 8, args.max_tokens))  # warm the path
        targets = {"replica": "ServeReplica:ppg-profile"}
        if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":  # else the proxy is an idle fallback
            targets["proxy"] = "ProxyActor"

        pids = {name: process_ids(marker) for name, marker in targets.items()}
        missing = [name for name, found in pids.items() if len(found) != 1]
        if missing:
            raise RuntimeError(f"expected one process each, found {pids}")
        # the load runs longer than the recording, so every sample is under load
        load_seconds = args.requests / args.expected_rate
        recorders = {
            name: record(found[0], max(1, load_seconds * 0.8), args.rate, tmp / f"{name}.txt")
            for name, found in pids.items()
        }
        start = time.perf_counter()
        latencies, seconds = asyncio.run(clients(url, messages, args.concurrency, args.max_tokens))
        for name, recorder in recorders.items():
            _, err = recorder.communicate(timeout=120)
            if recorder.returncode != 0:
                raise RuntimeError(f"py-spy on the {name} failed: {err[-2000:]}")
        result = {
            "requests": len(latencies),
            "concurrency": args.concurrency,
            "requests_per_s": len(latencies) / seconds,
            "load_seconds": time.perf_counter() - start,
            "rate_hz": args.rate,
            "processes": {},
        }
        for name in targets:
            result["processes"][name] = summary((tmp / f"{name}.txt").read_text(), args.top)
        return result
    finally:
        stop_server(settings.app_name)
        if started_ray:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def markdown(result: dict, command: str) -> str:
    lines = [
        f"`{command}`: {result['requests']} requests, {result['concurrency']} clients, "
        f"{result['requests_per_s']:.1f} requests/s while sampled at {result['rate_hz']} Hz.",
        "",
    ]
    for name, p in result["processes"].items():
        lines += [f"**{name}** ({p['samples']} samples): share of samples by innermost library", "",
                  "| where | share |", "|---|---:|"]  # fmt: skip
        lines += [f"| {g} | {share:.1%} |" for g, share in p["groups"].items()]
        lines += ["", "| innermost function | share |", "|---|---:|"]
        lines += [f"| `{f[:110]}` | {share:.1%} |" for f, share in p["top_functions"]]
        lines += ["", "| who makes the Ray-core calls (innermost frame outside Ray) | share |", "|---|---:|"]
        lines += [f"| `{f[:110]}` | {share:.1%} |" for f, share in p["ray_core_callers"]]
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["processes"])
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        groups = result["processes"][name]["groups"]
        labels = list(groups)[::-1]
        ax.barh(labels, [100 * groups[g] for g in labels], color="tab:blue")
        ax.set_xlabel("% of samples")
        ax.set_title(f"{name}: where the CPU goes ({title or str(result['concurrency']) + ' clients'})")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:tiny")
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument(
        "--expected-rate", type=float, default=50.0, help="requests/s to size the recording within the load"
    )
    parser.add_argument("--top", type=int, default=12, help="innermost functions listed per process")
    parser.add_argument(
        "--ingress",
        choices=["proxy", "haproxy"],
        default="proxy",
        help="serve.ingress of the cluster this starts; proxy (the default here) profiles Serve's "
        "Python proxy too, haproxy (serve.ingress's default; HAProxy is C, not sampled) the replica only",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/serve_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_text(args.out / "serve_profile.json", json.dumps(result, indent=1))
    text = markdown(result, command.strip())
    atomic_write_text(args.out / "serve_profile.md", text)
    plot(result, args.out / "serve_profile.png")
    print(text)
    return result


if __name__ == "__main__":
    main()
