"""Peak memory of each process kind of the main job, and of the whole job (issue 18 item 4).

Starts a real, short ``ppg train`` (the shipped default config, the live HTTP policy enabled, a
few overrides for length) as a child process and samples every process of its tree with psutil:
the driver, everything its local Ray cluster starts (GCS, raylet, agents, idle workers) and every
actor (rollout pool, rollout workers, Ray Train's controller and learner workers, Serve's
controller, proxy and replicas, the LLM partner). While it trains, a client thread keeps the HTTP
policy busy with 32 concurrent chat requests at a time, so the replica's peak is the one under load.

Why per-process RSS *and* PSS/USS: torch, vLLM and Ray's shared libraries and the plasma object
store are mapped into many processes; RSS counts them in each, so the sum of RSS overstates the
job. PSS splits every shared page among the processes that map it (the sum is the job's true
footprint); USS is what a process alone holds (what killing it frees).

    python benchmarks/memory.py                      # ~2-3 min on 2 cores
    python benchmarks/memory.py --partner llm        # also the shared LLM partner actor
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20

# (kind, pattern on the process's command line / title); first match wins. Ray sets an actor
# process's title to "ray::<Class>.<method>" (or "ray::<Class>" when idle).
KINDS = [
    ("rollout pool", r"^ray::RolloutPool"),
    ("rollout worker", r"^ray::RolloutWorker"),
    ("learner worker", r"^ray::RayTrainWorker"),
    ("serve replica", r"^ray::ServeReplica"),
    ("partner (LLM actor)", r"^ray::ChatLLM"),
    ("train controller", r"^ray::TrainController"),
    ("serve controller", r"^ray::ServeController"),
    ("serve proxy", r"^ray::ProxyActor"),
    ("serve HAProxy manager", r"^ray::HAProxyManager"),  # serve.ingress=haproxy (the default)
    ("haproxy", r"(^|/)haproxy( |$)"),
    ("policy registry", r"^ray::PolicyRegistry"),
    ("ray idle worker", r"^ray::IDLE|default_worker\.py"),  # a worker process before its actor starts
    (
        "ray system (gcs, raylet, agents)",
        r"gcs_server|raylet|dashboard|log_monitor|monitor\.py|Agent|agent/main\.py",
    ),
]
VAGUE = ("gone", "ray idle worker")  # labels a process may carry before it becomes an actor
MAIN_KINDS = [
    "driver",
    "rollout pool",
    "rollout worker",
    "learner worker",
    "serve replica",
    "partner (LLM actor)",
]


def classify(proc: psutil.Process, root: int) -> str:
    if proc.pid == root:
        return "driver"
    try:
        line = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "gone"
    for kind, pattern in KINDS:
        if re.search(pattern, line):
            return kind
    match = re.match(r"ray::(\w+)", line)
    return f"ray actor {match.group(1)}" if match else f"other ({proc.name()})"


def sample(root: psutil.Process) -> list[dict]:
    """One reading of every process in the tree: pid, kind, rss, pss, uss (bytes)."""
    rows = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            full = proc.memory_full_info()  # smaps_rollup: rss, pss, uss
            rows.append(
                {
                    "pid": proc.pid,
                    "kind": classify(proc, root.pid),
                    "rss": full.rss,
                    "pss": full.pss,
                    "uss": full.uss,
                }
            )
        except psutil.Error:
            continue
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_clients(url: str, stop: threading.Event, counts: dict, concurrency: int = 32) -> None:
    """Waves of ``concurrency`` chat requests against the live policy until ``stop``."""
    body = json.dumps(
        {
            "model": "ppg-policy",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "i like jazz. any music ideas?"}],
        }
    ).encode()

    def one() -> None:
        request = urllib.request.Request(
            f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                r.read()
            counts["ok"] += 1
        except Exception:  # noqa: BLE001 - the server is not up yet, or reloading: count and go on
            counts["failed"] += 1

    while not stop.is_set():
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
        except Exception:  # noqa: BLE001
            stop.wait(1.0)
            continue
        threads = [threading.Thread(target=one) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def run(args) -> dict:
    port = free_port()
    out = Path(tempfile.mkdtemp(prefix="ppg-memory-"))
    overrides = [
        f"run.iterations={args.iterations}",
        f"run.output_dir={out}",
        "run.name=memory",
        f"run.final_eval_episodes={args.eval_episodes}",
        "serve.enabled=true",
        f"serve.port={port}",
        *(["problem.partner=llm"] if args.partner == "llm" else []),
        *args.overrides,
    ]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    command = [sys.executable, "-m", "ppg.cli", "train", *overrides]
    print("running:", " ".join(command), flush=True)
    load_before = os.getloadavg()
    log = open(out / "train.log", "w")  # noqa: SIM115 - the child writes it until it exits
    child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(child.pid)
    stop, counts = threading.Event(), {"ok": 0, "failed": 0}
    client = threading.Thread(
        target=load_clients, args=(f"http://127.0.0.1:{port}", stop, counts), daemon=True
    )
    client.start()
    peaks: dict[int, dict] = {}  # pid -> kind, peak rss/pss/uss
    totals = []  # (t, sum rss, sum pss, sum uss)
    kind_sum_peak: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    loads = []
    while child.poll() is None:
        rows = sample(root)
        t = time.perf_counter() - start
        totals.append(
            (t, sum(r["rss"] for r in rows), sum(r["pss"] for r in rows), sum(r["uss"] for r in rows))
        )
        per_kind: dict[str, float] = defaultdict(float)
        for r in rows:
            p = peaks.setdefault(r["pid"], {"kind": r["kind"], "rss": 0, "pss": 0, "uss": 0})
            if r["kind"] not in VAGUE and not r["kind"].startswith("other"):  # idle -> its actor
                p["kind"] = r["kind"]
            for key in ("rss", "pss", "uss"):
                p[key] = max(p[key], r[key])
            per_kind[r["kind"]] += r["pss"]
        for kind, v in per_kind.items():
            kind_sum_peak[kind] = max(kind_sum_peak[kind], v)
        loads.append(os.getloadavg()[0])
        time.sleep(args.interval)
    stop.set()
    log.close()
    if child.returncode:
        print((out / "train.log").read_text()[-4000:])
        raise SystemExit(f"ppg train failed ({child.returncode}); log in {out}/train.log")
    kinds: dict[str, dict] = {}
    for p in peaks.values():
        k = kinds.setdefault(
            p["kind"], {"processes": 0, "peak_rss_mib": 0.0, "peak_pss_mib": 0.0, "peak_uss_mib": 0.0}
        )
        k["processes"] += 1
        for key in ("rss", "pss", "uss"):
            k[f"peak_{key}_mib"] = max(k[f"peak_{key}_mib"], p[key] / MiB)
    for kind, v in kind_sum_peak.items():  # a worker first seen idle is counted under its actor above
        if kind in kinds:
            kinds[kind]["peak_pss_all_processes_mib"] = v / MiB
    return {
        "command": " ".join(command[2:]),
        "wall_s": time.perf_counter() - start,
        "samples": len(totals),
        "interval_s": args.interval,
        "load_before": load_before,
        "load_during_mean_1min": sum(loads) / max(1, len(loads)),
        "load_after": os.getloadavg(),
        "serve_requests": counts,
        "whole_job": {
            "peak_rss_sum_mib": max(t[1] for t in totals) / MiB,
            "peak_pss_sum_mib": max(t[2] for t in totals) / MiB,
            "peak_uss_sum_mib": max(t[3] for t in totals) / MiB,
            "processes_seen": len(peaks),
        },
        "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["peak_rss_mib"])),
        "timeline": [[round(t, 2), round(r / MiB, 1), round(p / MiB, 1)] for t, r, p, _ in totals],
    }


def table(result: dict) -> str:
    lines = [
        "| process kind | processes | peak RSS (MiB) | peak PSS (MiB) | peak USS (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    kinds = result["kinds"]
    order = [k for k in MAIN_KINDS if k in kinds] + [k for k in kinds if k not in MAIN_KINDS]
    for kind in order:
        k = kinds[kind]
        name = f"**{kind}**" if kind in MAIN_KINDS else kind
        lines.append(
            f"| {name} | {k['processes']} | {k['peak_rss_mib']:,.0f} | {k['peak_pss_mib']:,.0f} | {k['peak_uss_mib']:,.0f} |"
        )
    w = result["whole_job"]
    lines.append(
        f"| **whole job** (sum over its {w['processes_seen']} processes, at its peak) | | "
        f"{w['peak_rss_sum_mib']:,.0f} | {w['peak_pss_sum_mib']:,.0f} | {w['peak_uss_sum_mib']:,.0f} |"
    )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = result["kinds"]
    names = [k for k in MAIN_KINDS if k in kinds] + [k for k in kinds if k not in MAIN_KINDS]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    y = range(len(names))
    a.barh([i + 0.2 for i in y], [kinds[n]["peak_rss_mib"] for n in names], 0.4, label="peak RSS")
    a.barh([i - 0.2 for i in y], [kinds[n]["peak_pss_mib"] for n in names], 0.4, label="peak PSS")
    a.set_yticks(list(y), names)
    a.invert_yaxis()
    a.set_xlabel("MiB (largest process of the kind)")
    a.legend()
    t = [row[0] for row in result["timeline"]]
    b.plot(t, [row[1] for row in result["timeline"]], label="sum of RSS")
    b.plot(t, [row[2] for row in result["timeline"]], label="sum of PSS (true footprint)")
    b.set_xlabel("seconds since ppg train started")
    b.set_ylabel("MiB, whole job")
    b.legend()
    fig.suptitle("ppg train (default config, serve enabled): memory per process kind")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--eval-episodes", type=int, default=16)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--partner", choices=["scripted", "llm"], default="scripted")
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides for ppg train")
    args = parser.parse_args()
    result = run(args)
    stem = f"memory{'_' + args.tag if args.tag else ''}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (RESULTS / f"{stem}.md").write_text(
        f"`{result['command']}`, {result['wall_s']:.0f} s, load {result['load_before'][0]:.1f} before, "
        f"{result['load_during_mean_1min']:.1f} during (1-min mean), {result['load_after'][0]:.1f} after; "
        f"serve requests {result['serve_requests']}\n\n{md}\n"
    )
    plot(result, RESULTS / f"{stem}.png")
    print(md)
    print(
        f"load before/during/after: {result['load_before'][0]:.2f} / {result['load_during_mean_1min']:.2f} / {result['load_after'][0]:.2f}"
    )


if __name__ == "__main__":
    main()
