"""``ppg serve``: the OpenAI-compatible Ray Serve app, driven by the official ``openai`` client.

One live application per module (Ray on loopback, Serve bound to 127.0.0.1 on a free port, one vLLM
replica on the embedded tiny model, a bearer key configured). Fast tests above the fixture need no
server.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest
import yaml

from ppg.serve.settings import Autoscaling, ServeSettings

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-not-secret"


# ---- no server ---------------------------------------------------------------------------------
def test_read_write_lock_reload_waits_for_readers_and_blocks_new_ones():
    from ppg.serve.app import ReadWriteLock

    async def scenario() -> list[str]:
        lock, events = ReadWriteLock(), []

        async def reader(name: str, hold: float):
            async with lock.read():
                events.append(f"{name}+")
                await asyncio.sleep(hold)
                events.append(f"{name}-")

        async def writer():
            async with lock.write():
                events.append("W+")
                await asyncio.sleep(0.02)
                events.append("W-")

        first = asyncio.create_task(reader("r1", 0.05))
        await asyncio.sleep(0.01)
        w = asyncio.create_task(writer())
        await asyncio.sleep(0.01)
        late = asyncio.create_task(reader("r2", 0.0))
        await asyncio.gather(first, w, late)
        return events

    assert asyncio.run(scenario()) == ["r1+", "r1-", "W+", "W-", "r2+", "r2-"]


def test_settings_from_config_and_deploy_file():
    from ppg.config import load_config

    cfg = load_config(None, ["serve.port=8123", "serve.max_tokens_limit=32", "model.max_model_len=512"])
    s = ServeSettings.from_config(cfg, "/some/ckpt", max_n=2)
    assert (s.host, s.port, s.max_tokens_limit, s.max_model_len, s.max_n) == ("127.0.0.1", 8123, 32, 512, 2)
    with pytest.raises(ValueError, match="min_replicas"):
        Autoscaling(min_replicas=3, max_replicas=2)

    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (application,) = schema.applications
    assert application.import_path == "ppg.serve.app:build_app"
    ServeSettings.model_validate(application.args)  # the builder's args are valid settings


def test_initial_version_from_checkpoint_state(tmp_path):
    (tmp_path / "policy").mkdir()
    (tmp_path / "state.json").write_text('{"iteration": 30, "policy_version": 7}')
    assert ServeSettings(checkpoint=str(tmp_path)).initial_version(tmp_path / "policy") == 7
    assert ServeSettings(checkpoint=str(tmp_path), policy_version=2).initial_version(tmp_path / "policy") == 2
    assert ServeSettings(checkpoint="x").initial_version(tmp_path / "elsewhere" / "policy") == 0


def test_serve_main_refuses_a_missing_checkpoint(tmp_path, capsys):
    from ppg.serve.cli import serve_main

    assert serve_main(str(tmp_path / "missing")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert serve_main(str(tmp_path), overrides=["serve.port=0"]) == 2  # config errors name the field
    assert "serve.port" in capsys.readouterr().err


# ---- live server -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ppg.models import resolve_model
    from ppg.serve.service import start_server, stop_server

    key_file = tmp_path_factory.mktemp("serve") / "key"
    key_file.write_text(KEY)
    settings = ServeSettings(
        checkpoint=resolve_model("embedded:tiny"),
        app_name="ppg-test",
        port=_free_port(),
        max_tokens_limit=32,
        max_n=2,
        max_model_len=256,
        kv_cache_gib=1,
        api_key_file=str(key_file),
        reload_poll_s=0.2,
    )
    handle = start_server(settings)
    yield f"http://127.0.0.1:{settings.port}", handle, settings
    stop_server(settings.app_name)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _health(base: str) -> dict:
    import httpx

    return httpx.get(base + "/healthz", timeout=10).json()


PERSONA = [
    {"role": "system", "content": "You are talking with Ana, who loves jazz and hates crowds."},
    {"role": "user", "content": "hello, can you recommend something?"},
]


@pytest.mark.slow
def test_chat_completion_names_the_version(server, client):
    base, _, _ = server
    version = _health(base)["policy_version"]
    raw = client.chat.completions.with_raw_response.create(
        model="ppg-policy", messages=PERSONA, max_tokens=16, temperature=0
    )
    reply = raw.parse()
    assert raw.headers["x-ppg-policy-version"] == str(version)
    assert reply.system_fingerprint == f"ppg-v{version}" and reply.model == f"ppg-policy-v{version}"
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 0

    two = client.chat.completions.create(model="ppg-policy", messages=PERSONA, max_tokens=8, n=2, seed=3)
    assert [c.index for c in two.choices] == [0, 1]


@pytest.mark.slow
def test_streaming_matches_the_full_reply(server, client):
    full = client.chat.completions.create(model="ppg-policy", messages=PERSONA, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="ppg-policy", messages=PERSONA, max_tokens=16, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert len(chunks) > 3  # token by token, not one blob
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert {c.system_fingerprint for c in chunks} == {full.system_fingerprint}


@pytest.mark.slow
def test_models_and_health(server, client):
    base, _, _ = server
    (model,) = client.models.list().data
    health = _health(base)  # no key needed: for probes
    assert model.id == f"ppg-policy-v{health['policy_version']}" == health["model"]
    assert health["status"] == "ok"


@pytest.mark.slow
def test_client_errors_surface_as_openai_exceptions(server, client):
    import openai

    cases = [
        ({"max_tokens": 33}, "max_tokens"),
        ({"max_completion_tokens": 1000}, "max_completion_tokens"),
        ({"n": 3}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),  # over 256 tokens
        ({"messages": []}, "messages"),
    ]
    for extra, param in cases:
        kwargs = {"model": "ppg-policy", "messages": PERSONA, **extra}
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**kwargs)
        assert err.value.body["param"] == param, (extra, err.value.body)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=PERSONA)
    assert err.value.body["param"] == "model"

    import httpx

    base = server[0]
    bad_key = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model="ppg-policy", messages=PERSONA)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    r = httpx.post(base + "/v1/chat/completions", json={"messages": PERSONA})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert KEY not in r.text


@pytest.mark.slow
def test_raw_malformed_requests_are_4xx_json(server):
    import httpx

    base, _, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    url = base + "/v1/chat/completions"
    cases = [
        (b'{"messages": [', None),
        (b'["not", "an", "object"]', None),
        (b'{"messages": [{"role": "tool", "content": "hi"}]}', "messages[0].role"),
        (b'{"messages": [{"role": "user"}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', "max_tokens"),
    ]
    for body, param in cases:
        r = httpx.post(url, content=body, headers={**auth, "content-type": "application/json"})
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert error["param"] == param, (body, error)
        assert "x-ppg-policy-version" in r.headers
    r = httpx.get(base + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def _perturbed_weights(folder: str, seed: int) -> dict:
    import torch

    from ppg.rollout.engine import load_state_dict

    g = torch.Generator().manual_seed(seed)
    state = load_state_dict(folder)
    return {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.mark.slow
def test_load_with_reload_in_the_middle_drops_nothing(server):
    """32 concurrent clients x 4 requests on loopback; a reload to a new version mid-way."""
    import openai

    base, handle, settings = server
    v0 = _health(base)["policy_version"]
    greedy = {"model": "ppg-policy", "messages": PERSONA, "max_tokens": 16, "temperature": 0}
    check = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    before = check.chat.completions.create(**greedy)

    clients, per_client = 32, 4
    results: list[tuple[float, float, str]] = []  # (start, latency, fingerprint)
    failures: list[BaseException] = []
    done = threading.Semaphore(0)
    lock = threading.Lock()

    def worker(i: int) -> None:
        c = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        for j in range(per_client):
            start = time.perf_counter()
            try:
                r = c.chat.completions.create(
                    model="ppg-policy",
                    messages=[*PERSONA[:1], {"role": "user", "content": f"client {i} asks {j}"}],
                    max_tokens=12,
                    seed=i * 100 + j,
                    stream=(j % 2 == 1),
                )
                if j % 2 == 1:
                    fingerprint = {chunk.system_fingerprint for chunk in r}.pop()
                else:
                    fingerprint = r.system_fingerprint
                with lock:
                    results.append((start, time.perf_counter() - start, fingerprint))
            except BaseException as e:  # noqa: BLE001 - every failure is counted
                with lock:
                    failures.append(e)
            done.release()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for _ in range(clients * per_client // 3):  # a third of the requests answered: reload now
        done.acquire()
    reload_start = time.perf_counter()
    new_version = v0 + 1
    assert (
        handle.reload.remote(new_version, _perturbed_weights(settings.checkpoint, 1)).result() == new_version
    )
    reload_s = time.perf_counter() - reload_start
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - t0

    assert not failures, failures[:3]
    assert len(results) == clients * per_client
    fingerprints = {f for _, _, f in results}
    assert fingerprints == {f"ppg-v{v0}", f"ppg-v{new_version}"}, fingerprints
    latencies = sorted(lat for _, lat, _ in results)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(
        f"\nserve load: {len(results)} requests from {clients} clients in {wall:.1f} s "
        f"({len(results) / wall:.1f} req/s), p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"reload {reload_s:.2f} s (including waiting for in-flight batches)"
    )

    after = check.chat.completions.create(**greedy)
    assert after.system_fingerprint == f"ppg-v{new_version}"
    assert after.choices[0].message.content != before.choices[0].message.content  # new weights answer


@pytest.mark.slow
def test_published_version_reaches_replicas_by_polling(server):
    """The multi-replica path: publish to the app's registry; replicas poll and reload themselves."""
    from ppg.policy_registry import publish_policy

    base, _, settings = server
    current = _health(base)["policy_version"]
    assert publish_policy(settings.app_name, current + 1, settings.checkpoint)
    assert not publish_policy(settings.app_name, current, settings.checkpoint)  # older: ignored
    _wait_for_version(base, current + 1)
    # a state dict travels through the object store (the registry owns the copy)
    assert publish_policy(settings.app_name, current + 2, _perturbed_weights(settings.checkpoint, 2))
    _wait_for_version(base, current + 2)


def _wait_for_version(base: str, version: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while _health(base)["policy_version"] != version:
        assert time.time() < deadline, f"replica did not pick up version {version}"
        time.sleep(0.2)
