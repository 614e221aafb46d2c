"""Any Hugging Face chat model, not only the embedded one: a local folder laid out as real chat
models ship (Qwen2 architecture, ChatML template and stop token, sharded weights, an embedding
padded past the tokenizer; tests/hf_layouts.py) trains, checkpoints with its tokenizer as
transformers saves it, resumes, is evaluated and is served over HTTP. A hub name takes the same
path (``AutoTokenizer``/``save_pretrained`` never look at files by name); it cannot be downloaded on
this machine, so the local folder stands in for it."""

from __future__ import annotations

import socket

import httpx
import pytest
from hf_layouts import CHATML, chatml_model_folder
from transformers import AutoTokenizer

from ppg.config import load_config
from ppg.driver import train
from ppg.evaluate import evaluate
from ppg.learner.checkpoint import latest_checkpoint, load_state
from ppg.learner.metrics import read_metrics
from ppg.models import resolve_model
from ppg.serve.service import start_server, stop_server
from ppg.serve.settings import ServeSettings

pytestmark = pytest.mark.slow

TINY = [
    "problem.name=myopic",
    "rollout.episodes_per_iteration=8",
    "rollout.group_size=4",
    "rollout.num_workers=1",
    "rollout.max_tokens_per_turn=8",
    "run.checkpoint_every=1",
    "run.final_eval_episodes=0",
]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return chatml_model_folder(tmp_path_factory.mktemp("chatml"), resolve_model("embedded:tiny"))


def test_a_chat_model_of_another_layout_trains_resumes_evaluates_and_serves(ray_cluster, chatml, tmp_path):
    config = load_config(None, [f"model.name_or_path={chatml}", *TINY, "run.iterations=1"])
    config = config.model_copy(update={"run": config.run.model_copy(update={"output_dir": tmp_path})})
    run = train(config, run_dir=tmp_path / "chatml")

    first = latest_checkpoint(run)  # validated: weights, config, the tokenizer fits the embedding
    saved = AutoTokenizer.from_pretrained(first / "policy")
    assert saved.chat_template == CHATML and saved.convert_tokens_to_ids("<|im_end|>") == saved.eos_token_id

    run = train(resume=run, overrides=["run.iterations=2"])
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1]
    final = latest_checkpoint(run)
    assert final.name == "iter_000002" and load_state(final)[0]["policy_version"] == 2

    report = evaluate(final, episodes=4, out=tmp_path / "eval")
    assert report["episodes"] == 4 and (tmp_path / "eval" / "report.md").is_file()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(checkpoint=str(final), app_name="ppg-chatml", port=port, max_model_len=512)
    start_server(settings)
    try:
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "ppg-policy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-ppg-policy-version"] == "2"
        assert isinstance(answer.json()["choices"][0]["message"]["content"], str)
    finally:
        stop_server(settings.app_name)
