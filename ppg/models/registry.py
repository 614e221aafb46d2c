"""Turn a configured model name into a local HF folder: build the embedded model, or validate a path.

``resolve_model`` is called by every process that loads the policy (rollout workers, learner, Serve),
so the embedded build is cached and guarded by a file lock: the first caller builds, the others wait
and then reuse the folder. Only safetensors weights are accepted, because pickle checkpoints
(``pytorch_model.bin``) can execute code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from ppg.env.corpus import sft_conversations
from ppg.models.sft import SFTResult, SFTSpec, train_sft
from ppg.models.tiny import TinyModelSpec, init_model, num_parameters, save_model_folder
from ppg.models.tokenizer import Message, conversation_texts, train_tokenizer

EMBEDDED_PREFIX = "embedded:"
RECIPE_VERSION = "tiny-llama-v4"
"""Bump when the build code changes in a way the spec does not capture: it invalidates old caches."""
BUILD_INFO = "ppg_build.json"


class ModelPathError(ValueError):
    """A model name or folder that cannot be loaded; the message says what to do instead."""


class EmbeddedRecipe(BaseModel):
    """Everything that determines the embedded model's bytes (besides the code, see RECIPE_VERSION)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: TinyModelSpec = Field(default_factory=TinyModelSpec)
    sft: SFTSpec = Field(default_factory=SFTSpec)
    num_conversations: PositiveInt = 1600
    corpus_seed: int = 0


EMBEDDED_MODELS: dict[str, EmbeddedRecipe] = {"tiny": EmbeddedRecipe()}


def default_cache_dir() -> Path:
    """``$PPG_CACHE_DIR/models``, else ``~/.cache/ppg/models``."""
    return Path(os.environ.get("PPG_CACHE_DIR", "~/.cache/ppg")).expanduser() / "models"


# A Hugging Face hub id: "name" or "org/name" (letters, digits, - _ .), never two slashes.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> str:
    """Return a local folder (or, for hub names, the name itself) that transformers and vLLM can load.

    - ``embedded:tiny``: built on first use (~1-2 min on CPU) under ``cache_dir``, then reused.
    - an existing folder: checked for config.json, safetensors weights and a tokenizer.
    - a missing path (starting with ``/``, ``.`` or ``~``, not shaped like a hub id, or under a
      folder that exists here): an error naming it.
    - a hub id (``org/name``): returned unchanged (nothing is downloaded here).
    """
    if not name_or_path.strip():
        raise ModelPathError(f"empty model name; use '{EMBEDDED_PREFIX}tiny', an HF folder or a hub name")
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return str(_resolve_embedded(name_or_path.removeprefix(EMBEDDED_PREFIX), cache_dir))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(validate_model_folder(path))
    first = Path(name_or_path.split("/")[0])
    if name_or_path.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(name_or_path) or first.is_dir():
        # not a hub id (org/name), or its first part is a folder here: a local path that is missing
        raise ModelPathError(
            f"model path {name_or_path!r} does not exist (under {Path.cwd()}); point "
            "model.name_or_path at an HF folder (config.json + *.safetensors + tokenizer), a hub id "
            f"such as Qwen/Qwen2.5-0.5B-Instruct, or '{EMBEDDED_PREFIX}tiny'"
        )
    return name_or_path


def validate_model_folder(path: Path) -> Path:
    """Check that ``path`` is a loadable HF causal-LM folder; return it absolute."""
    path = path.resolve()
    if not path.is_dir():
        raise ModelPathError(f"model path {str(path)!r} is a file; give the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise ModelPathError(
            f"model folder {str(path)!r} has no config.json; save the model with save_pretrained() there"
        )
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        hint = f" (found pickle checkpoint(s) {pickles})" if pickles else ""
        raise ModelPathError(
            f"model folder {str(path)!r} has no *.safetensors weights{hint}; ppg loads weights only from "
            "safetensors, because pickle checkpoints can run code when loaded. Convert once with "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True) "
            "in an environment you trust"
        )
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelPathError(
            f"model folder {str(path)!r} has no tokenizer (tokenizer.json / tokenizer_config.json); "
            "save it there with tokenizer.save_pretrained()"
        )
    return path


def build_embedded_model(
    out_dir: Path | str,
    conversations: Sequence[Sequence[Message]],
    recipe: EmbeddedRecipe | None = None,
    progress: bool = True,
) -> tuple[Path, SFTResult]:
    """Train the tokenizer, initialise the tiny model, warm-start it with SFT and save it atomically.

    Deterministic: the same recipe and conversations give the same tokenizer.json and weights.
    ``ppg_build.json`` in the folder records the recipe, size, loss curve ends and timings.
    """
    recipe = recipe or EmbeddedRecipe()
    start = time.perf_counter()
    tokenizer = train_tokenizer(conversation_texts(conversations), vocab_size=recipe.model.vocab_size)
    model = init_model(recipe.model, tokenizer)
    result = train_sft(model, tokenizer, conversations, recipe.sft, progress=progress)
    info = {
        "recipe_version": RECIPE_VERSION,
        "recipe": recipe.model_dump(),
        "num_conversations": len(conversations),
        "corpus_fingerprint": corpus_fingerprint(conversations),
        "num_parameters": num_parameters(model),
        "tokenizer_size": len(tokenizer),
        "sft_first_loss": result.first_loss,
        "sft_last_loss": result.last_loss,
        "sft_seconds": round(result.seconds, 2),
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    out = save_model_folder(model, tokenizer, out_dir, {BUILD_INFO: json.dumps(info, indent=2) + "\n"})
    return out, result


def corpus_fingerprint(conversations: Sequence[Sequence[Message]]) -> str:
    """sha256 of the conversations' canonical JSON: a changed corpus means a new cache entry."""
    blob = json.dumps([[dict(m) for m in c] for c in conversations], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def embedded_cache_key(recipe: EmbeddedRecipe, conversations: Sequence[Sequence[Message]]) -> str:
    """Short hash of recipe version + recipe + corpus: the cache folder's suffix."""
    blob = json.dumps(
        {
            "version": RECIPE_VERSION,
            "recipe": recipe.model_dump(),
            "corpus": corpus_fingerprint(conversations),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _resolve_embedded(name: str, cache_dir: Path | None) -> Path:
    if name not in EMBEDDED_MODELS:
        raise ModelPathError(
            f"unknown embedded model {EMBEDDED_PREFIX}{name}; known: "
            + ", ".join(EMBEDDED_PREFIX + k for k in sorted(EMBEDDED_MODELS))
        )
    recipe = EMBEDDED_MODELS[name]
    if recipe not in _CACHE_KEYS:  # the corpus takes ~0.5 s to generate: once per process is enough
        _CACHE_KEYS[recipe] = embedded_cache_key(recipe, _corpus(recipe))
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"{name}-{_CACHE_KEYS[recipe]}"
    if _is_complete(target):
        return target.resolve()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _is_complete(target):  # another process may have built it while we waited
            build_embedded_model(target, _corpus(recipe), recipe)
    return target.resolve()


_CACHE_KEYS: dict[EmbeddedRecipe, str] = {}


def _corpus(recipe: EmbeddedRecipe) -> list[list[dict]]:
    return sft_conversations(recipe.num_conversations, recipe.corpus_seed)


def _is_complete(folder: Path) -> bool:
    """The folder appears only by an atomic rename, so its presence with weights means complete."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
