"""Serving beside training and across replicas, on a real Ray cluster (loopback) and real Serve HTTP.

* ``serve.enabled: true`` during ``ppg train``: the policy answers over HTTP while the learner trains,
  and the version it reports climbs with the learner's updates.
* Two replicas: one ``publish_policy`` call reaches both (each replica polls the version registry),
  and answers never go back to an older version.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from ppg.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotUp(Exception):
    pass


def _chat(base: str) -> tuple[int, str]:
    r = httpx.post(
        base + "/v1/chat/completions",
        json={"model": "ppg-policy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    if r.status_code in (404, 503) and "x-ppg-policy-version" not in r.headers:
        raise NotUp(r.status_code)  # Serve's proxy is up, the app is still deploying or already deleted
    r.raise_for_status()
    body = r.json()
    version = int(r.headers["x-ppg-policy-version"])
    assert body["system_fingerprint"] == f"ppg-v{version}"
    return version, body["model"]


@pytest.mark.slow
def test_train_with_serve_enabled_serves_the_live_policy(ray_cluster, tmp_path):
    from ppg.driver import train

    port = _free_port()
    config = load_config(
        None,
        [
            "run.iterations=4",
            "run.checkpoint_every=4",
            "run.final_eval_episodes=0",
            "rollout.episodes_per_iteration=8",
            "rollout.max_tokens_per_turn=8",
            "serve.enabled=true",
            "serve.app_name=ppg-live",
            f"serve.port={port}",
            "serve.reload_poll_s=0.1",
            "model.max_model_len=256",
            f"run.output_dir={tmp_path}",
        ],
    )
    base = f"http://127.0.0.1:{port}"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["run_dir"] = train(config, run_dir=tmp_path / "live")
        except BaseException as e:  # surfaced by the assertion below
            outcome["error"] = e

    trainer = threading.Thread(target=run, daemon=True)
    trainer.start()
    seen: list[int] = []
    deadline = time.monotonic() + 420
    while trainer.is_alive() and time.monotonic() < deadline:
        try:
            version, model = _chat(base)
        except (httpx.TransportError, NotUp):  # not up yet, or already stopped when training ended
            time.sleep(0.5)
            continue
        assert model == f"ppg-policy-v{version}"
        seen.append(version)
        time.sleep(0.2)
    trainer.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert (outcome["run_dir"] / "checkpoints" / "iter_000004").is_dir()
    assert seen, "the server never answered while training ran"
    assert seen == sorted(seen), f"a reply came from an older version after a newer one: {seen}"
    assert len(set(seen)) >= 2 and max(seen) >= 2, f"the served version did not follow training: {seen}"
    # after_training=stop (the default): the server is gone with the run
    with pytest.raises(httpx.TransportError):
        httpx.get(base + "/healthz", timeout=5)


@pytest.mark.slow
def test_one_publish_reaches_every_replica(ray_cluster, tmp_path):
    from ppg.models import resolve_model
    from ppg.policy_registry import publish_policy
    from ppg.serve.service import start_server, stop_server
    from ppg.serve.settings import ServeSettings

    policy = resolve_model("embedded:tiny")
    settings = ServeSettings(
        checkpoint=policy,
        app_name="ppg-two",
        port=_free_port(),
        num_replicas=2,
        max_model_len=256,
        reload_poll_s=0.1,
    )
    start_server(settings)
    base = f"http://127.0.0.1:{settings.port}"
    try:

        def replicas_at(version: int) -> set[str]:
            found = set()
            for _ in range(40):  # Serve routes each request to one replica; ask until both answered
                h = httpx.get(base + "/healthz", timeout=10).json()
                if h["policy_version"] >= version:
                    found.add(h["replica"])
                if len(found) == 2:
                    break
            return found

        assert len(replicas_at(0)) == 2
        assert publish_policy(settings.app_name, 3, policy)
        assert not publish_policy(settings.app_name, 2, policy)  # an older version is ignored
        deadline = time.monotonic() + 30
        while len(replicas_at(3)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(replicas_at(3)) == 2
        assert {_chat(base)[0] for _ in range(6)} == {3}
    finally:
        stop_server(settings.app_name)
