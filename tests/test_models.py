"""ppg.models: the embedded tiny model built for real (tokenizer, Llama init, SFT), loaded by
transformers and by vLLM on CPU, the cache, and the errors for unusable model paths."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppg.models import (
    END,
    EmbeddedRecipe,
    ModelPathError,
    SFTSpec,
    TinyModelSpec,
    build_embedded_model,
    encode_conversation,
    resolve_model,
    stop_token_ids,
)
from ppg.models.sft import IGNORE_INDEX, build_batch

SYSTEM = "you recommend things people enjoy. keep replies short."
TOPICS = {
    "music": ("jazz", "rock", "classical", "folk", "blues", "techno"),
    "food": ("sushi", "pizza", "curry", "tacos", "ramen", "pasta"),
}


def chat_corpus(n: int = 160, seed: int = 0) -> list[list[dict[str, str]]]:
    """Short lowercase recommendation chats from a few templates: quick to learn, independent of ppg.env."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(sorted(TOPICS))
        like, other = rng.sample(TOPICS[topic], 2)
        conv = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": rng.choice([f"any {topic} ideas?", f"suggest some {topic} please."])},
            {"role": "assistant", "content": f"sure. what {topic} do you like?"},
            {"role": "user", "content": f"i like {like}, not {other}."},
            {"role": "assistant", "content": f"then try more {like}."},
        ]
        if rng.random() < 0.5:
            conv += [{"role": "user", "content": "thanks!"}, {"role": "assistant", "content": "enjoy!"}]
        out.append(conv)
    return out


SMALL = EmbeddedRecipe(
    model=TinyModelSpec(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=192,
        seed=3,
    ),
    sft=SFTSpec(steps=120, batch_size=16, learning_rate=5e-3, seed=3),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """One real build of a small recipe on the template corpus, shared by the tests below."""
    out, result = build_embedded_model(
        tmp_path_factory.mktemp("m") / "tiny", chat_corpus(), SMALL, progress=False
    )
    return out, result


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    )


# ----------------------------------------------------------------------------------------------------
# build: determinism, files, loading in transformers, chat template, generation
# ----------------------------------------------------------------------------------------------------


def test_spec_rejects_head_size_vllm_cannot_run() -> None:
    with pytest.raises(ValueError, match="head size"):
        TinyModelSpec(hidden_size=64, num_heads=4, num_kv_heads=2)


def test_build_is_deterministic(tmp_path: Path) -> None:
    recipe = SMALL.model_copy(update={"sft": SMALL.sft.model_copy(update={"steps": 8})})
    a, _ = build_embedded_model(tmp_path / "a", chat_corpus(), recipe, progress=False)
    b, _ = build_embedded_model(tmp_path / "b", chat_corpus(), recipe, progress=False)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # a different seed gives different weights (the seed is really used)
    other = recipe.model_copy(update={"model": recipe.model.model_copy(update={"seed": 4})})
    c, _ = build_embedded_model(tmp_path / "c", chat_corpus(), other, progress=False)
    assert not torch.equal(
        ta["model.embed_tokens.weight"], load_file(c / "model.safetensors")["model.embed_tokens.weight"]
    )


def test_folder_contents_and_atomic_replace(built, tmp_path: Path) -> None:
    out, _ = built
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "ppg_build.json",
    } <= names
    assert not list(out.parent.glob(".tiny.*")), "temporary build folders must not be left behind"
    info = json.loads((out / "ppg_build.json").read_text())
    assert info["recipe"] == json.loads(SMALL.model_dump_json())
    # saving over an existing folder replaces it whole
    target = tmp_path / "again"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    build_embedded_model(
        target, chat_corpus(40), SMALL.model_copy(update={"sft": SFTSpec(steps=1)}), progress=False
    )
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_loads_in_transformers_with_chat_template(built) -> None:
    out, _ = built
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32 and tok.bos_token == "<|bos|>" and tok.pad_token == "<|pad|>"
    assert model.config.vocab_size == len(tok)  # every id the model can sample has a token
    messages = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "any music ideas?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|system|>be brief.<|end|><|user|>any music ideas?<|end|><|assistant|>"
    answered = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": "try jazz."}], tokenize=False
    )
    assert answered.endswith("<|user|>any music ideas?<|end|><|assistant|>try jazz.<|end|>")
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    # generation stops at <|end|>: it is in generation_config.eos_token_id
    end_id = tok.convert_tokens_to_ids(END)
    assert end_id in model.generation_config.eos_token_id
    for conv in chat_corpus(4, seed=9):
        ids = torch.tensor([prompt_ids(tok, conv[:4])])
        gen = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :].tolist()
        assert gen[-1] == end_id and len(gen) < 40, tok.decode(gen)
        reply = tok.decode(gen, skip_special_tokens=True)  # the corpus' answer form, on topic
        assert reply.startswith("then try more ") and reply[14:-1] in sum(TOPICS.values(), ()), reply


# ----------------------------------------------------------------------------------------------------
# SFT: the loss mask and the loss curve
# ----------------------------------------------------------------------------------------------------


def test_assistant_mask_covers_only_assistant_tokens(built) -> None:
    tok = AutoTokenizer.from_pretrained(built[0])
    conv = chat_corpus(1, seed=5)[0]
    ids, mask = encode_conversation(tok, conv)
    assert ids == list(tok.apply_chat_template(conv, tokenize=True)["input_ids"])
    masked = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert masked == "".join(m["content"] + END for m in conv if m["role"] == "assistant")
    assistant_id = tok.convert_tokens_to_ids("<|assistant|>")
    assert all(m == 0 for i, m in zip(ids, mask, strict=True) if i == assistant_id)
    batch = build_batch([(ids, mask), (ids[:5], mask[:5])], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ids))
    assert batch["attention_mask"][1].sum() == 5 and (batch["input_ids"][1, 5:] == tok.pad_token_id).all()
    assert (
        (batch["labels"] != IGNORE_INDEX) == torch.tensor([mask, mask[:5] + [0] * (len(ids) - 5)]).bool()
    ).all()


def test_sft_lowers_assistant_loss(built) -> None:
    _, result = built
    assert len(result.losses) == SMALL.sft.steps
    assert result.first_loss > 4.0  # ~ln(vocab size) for a fresh model
    assert sum(result.losses[-10:]) / 10 < 0.3 * result.first_loss


# ----------------------------------------------------------------------------------------------------
# vLLM on CPU: loads the folder, greedy float32 output equals transformers' token for token
# ----------------------------------------------------------------------------------------------------

VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
path, prompts = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=path, dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
          max_model_len=512, seed=0)
params = SamplingParams(temperature=0.0, max_tokens=40)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
print("RESULT" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


@pytest.mark.slow
def test_vllm_greedy_matches_transformers(built, tmp_path: Path) -> None:
    out, _ = built
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    convs = chat_corpus(3, seed=11)
    prompts = [prompt_ids(tok, convs[0][:2]), prompt_ids(tok, convs[1][:4]), prompt_ids(tok, convs[2][:1])]
    expected = [
        model.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False)[0, len(p) :].tolist()
        for p in prompts
    ]
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"),
        VLLM_LOGGING_LEVEL="WARNING",
    )
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(out), json.dumps(prompts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1].removeprefix("RESULT"))
    assert got == expected
    assert all(len(g) > 2 for g in got)  # real replies, not an immediate stop
    assert all(g[-1] in stop_token_ids(tok) for g in got)


# ----------------------------------------------------------------------------------------------------
# resolve_model: embedded cache (with concurrent builders), local folders, hub names, errors
# ----------------------------------------------------------------------------------------------------

RESOLVE_SCRIPT = """
import sys
from pathlib import Path
from ppg.models import registry
from ppg.models.registry import EmbeddedRecipe
registry.EMBEDDED_MODELS["quick"] = EmbeddedRecipe.model_validate_json(sys.argv[2])
print("PATH" + registry.resolve_model("embedded:quick", cache_dir=Path(sys.argv[1])))
"""


def test_resolve_embedded_builds_once_and_caches(tmp_path: Path) -> None:
    quick = SMALL.model_copy(update={"num_conversations": 60, "sft": SFTSpec(steps=5, batch_size=4)})
    cache = tmp_path / "cache"
    # two builders start at once; the lock makes one build and the other reuse its folder
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RESOLVE_SCRIPT, str(cache), quick.model_dump_json()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    paths = {
        line.removeprefix("PATH")
        for out, _ in outputs
        for line in out.splitlines()
        if line.startswith("PATH")
    }
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert folder.parent == cache.resolve() and folder.name.startswith("quick-")
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [folder.name]
    # later calls in-process return the cached folder without building
    from ppg.models import registry

    registry.EMBEDDED_MODELS["quick"] = quick
    try:
        mtime = (folder / "model.safetensors").stat().st_mtime_ns
        start = time.perf_counter()
        assert resolve_model("embedded:quick", cache_dir=cache) == str(folder)
        assert time.perf_counter() - start < 10
        assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    finally:
        del registry.EMBEDDED_MODELS["quick"]


def test_resolve_local_folder_and_hub_name(built) -> None:
    out, _ = built
    assert resolve_model(str(out)) == str(out.resolve())
    assert resolve_model("someorg/some-model") == "someorg/some-model"


def test_unknown_embedded_name_and_empty_name() -> None:
    with pytest.raises(ModelPathError, match="embedded:tiny"):
        resolve_model("embedded:huge")
    with pytest.raises(ModelPathError, match="empty model name"):
        resolve_model(" ")


def test_missing_local_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelPathError, match=f"{missing}.*does not exist"):
        resolve_model(str(missing))
    with pytest.raises(ModelPathError, match="does not exist"):
        resolve_model("./no/such/model")
    with pytest.raises(ModelPathError, match="does not exist"):  # not a hub id: two slashes
        resolve_model("runs/default/checkpoints")
    (tmp_path / "models").mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)  # "models/foo" looks like a hub id, but ./models is a folder here
        with pytest.raises(ModelPathError, match="'models/foo' does not exist"):
            resolve_model("models/foo")
    finally:
        os.chdir(cwd)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelPathError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelPathError, match=r"pytorch_model\.bin.*only from safetensors"):
        resolve_model(str(tmp_path))


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelPathError, match="no tokenizer"):
        resolve_model(str(tmp_path))
