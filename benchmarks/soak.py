"""Serve soak: C concurrent clients for S seconds against a live ``ppg serve`` app on 127.0.0.1, with R
weight reloads spread over the run; every request is checked and counted.

Why: the serving promise is "zero failed requests under load, across reloads". A short load test can
miss what only shows over time (a leak, a reload racing a batch, a slow poller); this runs long
enough to see several reloads under sustained load, and records the figures RELIABILITY.md quotes.

A request counts as failed if it raises (connection, timeout), answers non-200, or answers 200 with
a malformed body: no text, a ``system_fingerprint`` that disagrees with the ``x-ppg-policy-version``
header, or a stream without ``[DONE]``. Each client also checks that the version it is answered
with never goes back after a reload. Half the requests stream (SSE).

    python benchmarks/soak.py                  # 60 s, 32 clients, 2 reloads -> benchmarks/results/soak.{md,json}
    python benchmarks/soak.py --seconds 10     # quicker
    python benchmarks/soak.py --replicas 2 --kill-replica-at 20   # a replica SIGKILLed mid-soak

``soak()`` is also what ``tests/test_reliability_serve.py`` runs for a few seconds on its own server.
Traffic goes only to the loopback server this script starts; each client stops at the deadline.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when Ray is imported: loopback only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402

from ppg.files import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PERSONA = "You are talking with Ana, who loves jazz and hates crowds."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def _one_request(client: httpx.Client, key: str, i: int, j: int, max_tokens: int) -> int:
    """One chat request, checked; returns the policy version that answered (raises on any failure)."""
    stream = j % 2 == 1
    body = {
        "model": "ppg-policy",
        "messages": [
            {"role": "system", "content": PERSONA},
            {"role": "user", "content": f"client {i} asks {j}: any ideas for tonight?"},
        ],
        "max_tokens": max_tokens,
        "seed": i * 100_003 + j,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {key}"}
    r = client.post("/v1/chat/completions", json=body, headers=headers)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    version = int(r.headers["x-ppg-policy-version"])
    if stream:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            raise RuntimeError("stream did not end with [DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        fingerprints = {c["system_fingerprint"] for c in chunks}
        finished = [c for c in chunks if c["choices"][0]["finish_reason"]]
        if fingerprints != {f"ppg-v{version}"} or len(finished) != 1:
            raise RuntimeError(
                f"malformed stream: fingerprints {fingerprints}, {len(finished)} finish events"
            )
    else:
        reply = r.json()
        if reply["system_fingerprint"] != f"ppg-v{version}" or not reply["choices"][0]["message"]["content"]:
            raise RuntimeError(f"malformed reply: {r.text[:200]}")
    return version


def soak(
    base_url: str,
    api_key: str,
    reload: Callable[[int], float],
    seconds: float = 60.0,
    clients: int = 32,
    reloads: int = 2,
    max_tokens: int = 12,
    fault: Callable[[], str] | None = None,
    fault_at: float | None = None,
) -> dict:
    """Run the soak; ``reload(k)`` switches the server to its k-th new version and returns how long
    that took (s). ``fault()``, at ``fault_at`` seconds, breaks something (e.g. kills a replica) and
    says what. Returns the figures (requests, failures, latencies, versions) as a dict."""
    start = time.perf_counter()
    deadline = start + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    went_back: list[str] = []
    versions: dict[int, int] = {}
    failed_at: list[float] = []  # seconds into the run

    def client_loop(i: int) -> None:
        last = -1
        with httpx.Client(base_url=base_url, timeout=120) as client:
            j = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    version = _one_request(client, api_key, i, j, max_tokens)
                except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
                    with lock:
                        failures.append(f"client {i} request {j}: {type(e).__name__}: {e}"[:300])
                        failed_at.append(time.perf_counter() - start)
                else:
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        versions[version] = versions.get(version, 0) + 1
                        if version < last:
                            went_back.append(f"client {i}: version {last} then {version}")
                    last = max(last, version)
                j += 1

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    faults: list[str] = []
    if fault is not None:

        def inject() -> None:
            time.sleep(max(0.0, start + (fault_at or seconds / 2) - time.perf_counter()))
            faults.append(fault())

        threading.Thread(target=inject, daemon=True).start()
    reload_seconds = []
    for k in range(1, reloads + 1):  # evenly spread: at 1/3 and 2/3 of the run for two reloads
        time.sleep(max(0.0, start + seconds * k / (reloads + 1) - time.perf_counter()))
        reload_seconds.append(round(reload(k), 3))
    for t in threads:
        t.join(timeout=seconds + 300)
    wall = time.perf_counter() - start
    return {
        "seconds": seconds,
        "clients": clients,
        "requests": len(latencies) + len(failures),
        "failed": len(failures),
        "failures": failures[:10],
        "went_back": went_back[:10],
        "requests_per_s": round((len(latencies) + len(failures)) / wall, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
        "reload_s": reload_seconds,
        "requests_by_version": dict(sorted(versions.items())),
        "wall_s": round(wall, 1),
        "faults": faults,
        "fault_at_s": fault_at if fault is not None else None,
        "failed_at_s": [round(t, 2) for t in sorted(failed_at)],
    }


def kill_a_replica(app_name: str) -> Callable[[], str]:
    """``fault()`` that SIGKILLs one serving replica of ``app_name`` (found by its process title):
    what a crashed or OOM-killed replica does to the clients in flight, and how soon Serve heals."""
    import psutil

    def fault() -> str:
        replicas = [
            p
            for p in psutil.process_iter(["cmdline"])
            if f"ServeReplica:{app_name}" in " ".join(p.info["cmdline"] or [])
        ]
        if not replicas:
            return "no replica found to kill"
        victim = replicas[0]
        victim.kill()
        return f"killed replica pid {victim.pid} ({len(replicas)} running)"

    return fault


def perturbed_weights(folder: str, seed: int) -> dict:
    """The policy's weights plus noise: a new version whose answers differ."""
    import torch

    from ppg.rollout.engine import load_state_dict

    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) for k, v in load_state_dict(folder).items()
    }


def handle_reloader(handle, policy: str, first_version: int) -> Callable[[int], float]:
    """``reload(k)`` through the app's DeploymentHandle: version first_version + k, new weights."""

    def reload(k: int) -> float:
        weights = perturbed_weights(policy, k)
        t0 = time.perf_counter()
        assert handle.reload.remote(first_version + k, weights).result() == first_version + k
        return time.perf_counter() - t0

    return reload


def markdown(result: dict, command: str, load: tuple[float, float]) -> str:
    r = result
    versions = ", ".join(f"v{v}: {n}" for v, n in r["requests_by_version"].items())
    return "\n".join(
        [
            f"`{command}`",
            "",
            f"{os.cpu_count()} CPUs (shared); 1-min load average {load[0]:.1f} before, {load[1]:.1f} after; "
            f"{r.get('replicas', 1)} replica(s) (1 CPU each), embedded tiny model, max_tokens "
            f"{r.get('max_tokens', 12)}, half the requests streamed",
            "",
            "| clients | seconds | requests | failed | requests/s | p50 (ms) | p99 (ms) | max (ms) | reloads (s) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {r['clients']} | {r['seconds']:g} | {r['requests']} | {r['failed']} | {r['requests_per_s']} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {', '.join(str(s) for s in r['reload_s'])} |",
            "",
            f"Requests answered by each version: {versions}. Answers that went back to an older version "
            f"after a newer one: {len(r['went_back'])}.",
            "",
            *(
                [
                    f"Fault at {r['fault_at_s']:g} s: {'; '.join(r['faults'])}. Failed requests at (s): "
                    f"{', '.join(f'{t:g}' for t in r['failed_at_s'][:40]) or 'none'}; causes: "
                    f"{'; '.join(sorted({f.split(': ', 1)[1][:120] for f in r['failures']})) or '-'}.",
                    "",
                ]
                if r.get("faults")
                else []
            ),
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--reloads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument(
        "--kill-replica-at", type=float, metavar="S", help="SIGKILL one replica S seconds into the soak"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import ray

    from ppg.models import resolve_model
    from ppg.ray_session import connect
    from ppg.serve.service import start_server, stop_server
    from ppg.serve.settings import ServeSettings

    load_before = os.getloadavg()[0]
    policy = resolve_model("embedded:tiny")
    key = os.urandom(16).hex()
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key"
        key_file.write_text(key)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings = ServeSettings(
            checkpoint=policy,
            app_name="ppg-soak",
            port=port,
            max_tokens_limit=max(16, args.max_tokens),
            max_model_len=256,
            api_key_file=str(key_file),
            num_replicas=args.replicas,
        )
        connect()
        try:
            handle = start_server(settings)
            result = soak(
                f"http://127.0.0.1:{port}",
                key,
                handle_reloader(handle, policy, handle.policy_version.remote().result()),
                args.seconds,
                args.clients,
                args.reloads,
                args.max_tokens,
                fault=kill_a_replica(settings.app_name) if args.kill_replica_at is not None else None,
                fault_at=args.kill_replica_at,
            )
        finally:
            stop_server(settings.app_name)
            ray.shutdown()
    result["max_tokens"], result["replicas"] = args.max_tokens, args.replicas
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/soak.py", *given])
    args.out.mkdir(parents=True, exist_ok=True)
    name = "soak-replica-killed" if args.kill_replica_at is not None else "soak"
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", markdown(result, command, (load_before, os.getloadavg()[0])))
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=2))
    if result["failed"] or result["went_back"]:
        print("FAILURES:", *result["failures"], *result["went_back"], sep="\n  ")
    return result


if __name__ == "__main__":
    main()
