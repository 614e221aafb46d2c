"""Rollout on real components: vLLM (CPU) engines in Ray actors on loopback, the embedded tiny model,
the transformers engine as the reference."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from reference_episodes import render_tokens

from ppg.config import load_config
from ppg.env.conversation import run_conversations
from ppg.env.corpus import sft_conversations
from ppg.env.judges import RuleJudge
from ppg.env.partners import ScriptedPartner
from ppg.env.personas import load_personas
from ppg.env.problems import make_problem
from ppg.models import resolve_model
from ppg.rollout.engine import HFEngine, SamplingSpec, load_state_dict
from ppg.rollout.pool import RolloutPool, plan_requests
from ppg.rollout.trace import TokenPolicy

GREEDY = SamplingSpec(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("embedded:tiny")


@pytest.fixture(scope="module")
def hf(model_path):
    return HFEngine(model_path)


@pytest.fixture(scope="module")
def prompts(hf):
    return [
        hf.tokenizer.apply_chat_template(c[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
        for c in sft_conversations(8, seed=3)
    ]


@pytest.fixture(scope="module")
def pool(ray_cluster, model_path):
    config = load_config(None, ["problem.name=elicitation", "rollout.num_workers=2"])
    pool = RolloutPool(config, model_path, name_prefix="test-rollout")
    yield pool
    pool.shutdown()


def perturbed(model_path, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in load_state_dict(model_path).items()}


def test_plan_requests_groups_share_persona_and_seed():
    requests = plan_requests(load_personas(), num_episodes=24, group_size=4, num_requests=4, seed=0)
    assert len(requests) == 4 and sum(len(r.persona_ids) for r in requests) == 24
    assert len({r.request_id for r in requests}) == 4
    for r in requests:
        for k in range(0, len(r.group_ids), 4):
            assert (
                len(set(r.group_ids[k : k + 4]))
                == len(set(r.persona_ids[k : k + 4]))
                == len(set(r.seeds[k : k + 4]))
                == 1
            )
    assert requests == plan_requests(load_personas(), 24, 4, 4, seed=0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        plan_requests(load_personas(), 10, 4, 2, seed=0)


def test_token_trace_is_the_template_rendering_with_the_sampled_ids_as_actions(hf):
    problem = make_problem(load_config(None, ["problem.name=segmented"]).problem)
    policy = TokenPolicy(hf, GREEDY)
    conversations = run_conversations(
        problem, load_personas()[:3], [0, 1, 2], policy, ScriptedPartner(), RuleJudge()
    )
    for c, trace in zip(conversations, policy.traces, strict=True):
        ids, agent, turn = render_tokens(hf.tokenizer, c.messages)
        assert trace.ids == ids and trace.agent_mask == agent and trace.token_turn == turn
        assert all(lp == 0.0 for lp, a in zip(trace.logprobs, trace.agent_mask, strict=True) if not a)
        assert all(lp < 0.0 or lp == pytest.approx(0.0, abs=1e-3) for lp in trace.logprobs)


def test_ignore_eos_generates_exactly_max_tokens_past_the_end_of_turn(hf, prompts):
    """Benchmarks compare engines at equal lengths: with ignore_eos a reply runs on past its end of
    turn to max_tokens, and its start is the reply that stopped there."""
    stopped = hf.generate(prompts[:4], GREEDY)
    assert any(g.finish_reason == "stop" for g in stopped), "the embedded model ends its turn early"
    full = hf.generate(prompts[:4], dataclasses.replace(GREEDY, ignore_eos=True))
    for short, long in zip(stopped, full, strict=True):
        assert len(long.token_ids) == GREEDY.max_tokens and long.finish_reason == "length"
        assert long.token_ids[: len(short.token_ids)] == short.token_ids


@pytest.mark.slow
def test_vllm_worker_matches_transformers_greedy_before_and_after_a_weight_update(
    pool, hf, prompts, model_path
):
    import ray

    worker = next(iter(pool.workers.values()))
    before = ray.get(worker.generate.remote(prompts, GREEDY))
    assert [g.token_ids for g in before] == [g.token_ids for g in hf.generate(prompts, GREEDY)]

    new = perturbed(model_path)
    acks = pool.update_weights(1, new)
    assert set(acks.values()) == {1} and pool.versions() == acks
    hf.update_weights(new)
    after = ray.get(worker.generate.remote(prompts, GREEDY))
    assert [g.token_ids for g in after] == [g.token_ids for g in hf.generate(prompts, GREEDY)]
    assert [g.token_ids for g in after] != [g.token_ids for g in before], "the update changed nothing"
    for g_vllm, g_hf in zip(after, hf.generate(prompts, GREEDY), strict=True):
        assert g_vllm.logprobs == pytest.approx(g_hf.logprobs, abs=1e-3)


@pytest.mark.slow
def test_weights_from_a_checkpoint_folder(pool, model_path, hf, prompts, tmp_path):
    import ray

    pool.update_weights(2, model_path)  # back to the original weights, from disk
    hf.update_weights(model_path)
    worker = next(iter(pool.workers.values()))
    assert pool.versions() == {name: 2 for name in pool.workers}
    out = ray.get(worker.generate.remote(prompts, GREEDY))
    assert [g.token_ids for g in out] == [g.token_ids for g in hf.generate(prompts, GREEDY)]


@pytest.mark.slow
def test_weights_of_another_model_are_refused_and_the_workers_keep_working(pool, model_path, hf, prompts):
    """One bad update must not break a worker's engine (vLLM reloads through meta tensors: a shape
    found wrong halfway leaves it unable to generate): refused first by the pool, and by the engine
    itself when a worker is called directly; the version stays, generation is unchanged."""
    import ray

    from ppg.weights import WeightsMismatch

    state = load_state_dict(model_path)
    last = sorted(state)[-1]
    bad = {k: v + 1.0 for k, v in state.items()}  # every tensor differs: a partial load would show
    bad[last] = torch.zeros(3, 5)
    versions = pool.versions()
    with pytest.raises(WeightsMismatch, match=f"version 99 does not fit the running model.*{last}"):
        pool.update_weights(99, bad)
    worker = next(iter(pool.workers.values()))
    with pytest.raises(ray.exceptions.RayTaskError, match="does not fit the running model"):
        ray.get(worker.update_weights.remote(99, bad))
    assert pool.versions() == versions and pool.policy_version == max(versions.values())
    out = ray.get(worker.generate.remote(prompts, GREEDY))
    assert [g.token_ids for g in out] == [g.token_ids for g in hf.generate(prompts, GREEDY)]


@pytest.mark.slow
def test_collect_returns_exactly_the_requested_episodes(pool):
    requests = plan_requests(load_personas(), 16, 4, 4, seed=1, first_request_id=10)
    results = pool.collect(requests)
    assert [r.request_id for r in results] == [10, 11, 12, 13]
    assert {r.worker for r in results} == set(pool.workers), "work is spread over the workers"
    for request, result in zip(requests, results, strict=True):
        assert [e.persona_id for e in result.episodes] == list(request.persona_ids)
        assert [e.group_id for e in result.episodes] == list(request.group_ids)
        for e in result.episodes:
            assert (
                e.policy_version == pool.policy_version and len(e.rewards) == 4 and e.segment_ids == [0] * 4
            )
            assert len(e.token_ids) == len(e.agent_mask) == len(e.token_turn) == len(e.logprobs)
            replies = [m["content"] for m in e.messages if m["role"] == "assistant"]
            assert len(replies) == 4


@pytest.mark.slow
def test_an_error_inside_a_rollout_fails_the_collect_and_keeps_the_worker(pool):
    """A request the rollout code refuses (here: an unknown persona) is not a dead worker: it is
    not redone, no worker is replaced, the error names the request, and the pool works on."""
    from ppg.rollout.pool import RolloutError

    good = plan_requests(load_personas(), 4, 4, 1, seed=3, first_request_id=70)
    bad = dataclasses.replace(good[0], request_id=71, persona_ids=("no-such-persona",) * 4)
    workers, replaced = set(pool.workers), pool.replaced
    with pytest.raises(RolloutError, match=r"request 71 failed inside worker .*no-such-persona"):
        pool.collect([bad])
    assert set(pool.workers) == workers and pool.replaced == replaced
    assert len(pool.collect(good)[0].episodes) == 4


@pytest.mark.slow
def test_a_dead_worker_is_replaced_and_its_request_redone_once(pool):
    import ray

    requests = plan_requests(load_personas(), 48, 4, 12, seed=2, first_request_id=100)
    victim = next(iter(pool.workers))
    killer = threading.Timer(1.0, lambda: ray.kill(pool.workers[victim]))
    killer.start()
    replaced_before = pool.replaced
    results = pool.collect(requests)
    killer.join()
    assert pool.replaced == replaced_before + 1 and victim not in pool.workers
    assert len(pool.workers) + len(pool._starting) == 2, "a replacement is running or starting"
    pool.resize(2)  # waits for a replacement that is still starting
    assert len(pool.workers) == 2
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    episodes = [(e.persona_id, e.group_id) for r in results for e in r.episodes]
    wanted = [(p, g) for r in requests for p, g in zip(r.persona_ids, r.group_ids, strict=True)]
    assert episodes == wanted  # none lost, none doubled
    assert set(pool.versions().values()) == {pool.policy_version}, "the replacement got the current weights"


@pytest.mark.slow
def test_a_worker_dead_before_a_weight_push_or_reconfigure_is_replaced_not_fatal(pool):
    """A restarting learner's first call (reconfigure) can race the death of a worker: the chaos
    test lost its run to exactly that. The dead worker is dropped and its replacement starts on
    the pushed weights."""
    import ray

    for push in (
        lambda: pool.update_weights(7, load_state_dict(pool.model_path)),
        lambda: pool.reconfigure(pool.config, 8, load_state_dict(pool.model_path), keep_size=True),
    ):
        victim = next(iter(pool.workers))
        ray.kill(pool.workers[victim])
        replaced_before = pool.replaced
        acks = push()
        assert victim not in acks and victim not in pool.workers
        assert pool.replaced == replaced_before + 1
        pool.resize(2)  # waits for the replacement
        assert len(pool.workers) == 2 and set(pool.versions().values()) == {pool.policy_version}


@pytest.mark.slow
def test_resize_up_gives_new_workers_the_current_weights_and_down_stops_them(pool):
    pool.update_weights(5, load_state_dict(pool.model_path))
    pool.resize(3)
    assert len(pool.workers) == 3 and set(pool.versions().values()) == {5}
    results = pool.collect(plan_requests(load_personas(), 24, 4, 6, seed=3, first_request_id=200))
    assert sum(len(r.episodes) for r in results) == 24
    pool.resize(2)
    assert len(pool.workers) == 2
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        pool.resize(0)


@pytest.mark.slow
def test_resize_while_collecting(pool):
    requests = plan_requests(load_personas(), 32, 4, 8, seed=4, first_request_id=300)
    grow = threading.Timer(0.5, lambda: pool.resize(3))
    grow.start()
    start = time.perf_counter()
    results = pool.collect(requests)
    grow.join()
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    assert len(pool.workers) == 3 and time.perf_counter() - start < 300
    pool.resize(2)


@pytest.mark.slow
def test_workers_that_cannot_be_placed_do_not_stall_the_pool(pool, ray_cluster):
    """A resize beyond the cluster's CPUs leaves the extra workers pending; collecting and weight
    updates go on with the placed ones, and shrinking back drops the pending ones."""
    free = int(ray_cluster.available_resources().get("CPU", 0))
    pool.resize(len(pool.workers) + free + 2, wait=False)  # at least 2 can never be placed
    assert pool._starting, "the extra workers should be pending"
    requests = plan_requests(load_personas(), 16, 4, 4, seed=5, first_request_id=400)
    results = pool.collect(requests)
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    acks = pool.update_weights(pool.policy_version + 1, load_state_dict(pool.model_path))
    assert set(acks.values()) == {pool.policy_version}
    pool.resize(2)
    assert len(pool.workers) == 2 and not pool._starting
