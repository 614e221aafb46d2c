"""Checkpoints: a Hugging Face policy folder plus the trainer state needed to continue *exactly*.

Layout of ``RUN_DIR/checkpoints/iter_000010/``::

    policy/             config.json, model.safetensors, generation_config.json, tokenizer files
    trainer_state.pt    optimizer, LR scheduler, RNG states (tensors and numbers only)
    state.json          iteration, policy version, data cursor
    config.yaml         the resolved config of the run

Written into a hidden temporary folder and renamed into place, so a crash mid-write leaves the
previous checkpoint as the latest complete one. Trainer state loads with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ppg.config import PPGConfig

POLICY, TRAINER_STATE, STATE, CONFIG = "policy", "trainer_state.pt", "state.json", "config.yaml"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the folder, what is wrong, and the fix."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    model: torch.nn.Module,
    tokenizer_dir: str | Path,
    trainer_state: dict,
    state: dict,
    config: PPGConfig,
) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".iter_{iteration:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / POLICY, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy2(src, tmp / POLICY / name)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    (tmp / STATE).write_text(json.dumps(state, indent=2))
    (tmp / CONFIG).write_text(config.to_yaml())
    if final.exists():  # re-saving the same iteration (e.g. the final one): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoint_dir(run_dir).glob(".iter_*.tmp-*"):  # leftovers of interrupted writes
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    return sorted(p for p in root.glob("iter_*") if p.is_dir()) if root.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Path:
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointError(
            f"{run_dir} has no checkpoints (expected {checkpoint_dir(run_dir)}/iter_*); "
            "pass the folder of a run that saved at least one (run.checkpoint_every)"
        )
    return checkpoints[-1]


def validate_checkpoint(path: Path, require_trainer_state: bool = True) -> Path:
    """Refuse a checkpoint that is incomplete, corrupt, pickled, or whose tokenizer does not fit."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    policy = path / POLICY if (path / POLICY).is_dir() else path
    needed = ["config.json", "tokenizer.json"] + (
        [f"../{TRAINER_STATE}", f"../{STATE}"] if require_trainer_state else []
    )
    missing = [n.removeprefix("../") for n in needed if not (policy / n).resolve().is_file()]
    if not list(policy.glob("*.safetensors")):
        pickles = [p.name for p in policy.glob("*.bin")] + [p.name for p in policy.glob("*.pt")]
        hint = f" (found pickle files {pickles}: weights are loaded only from safetensors)" if pickles else ""
        missing.append("model.safetensors" + hint)
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: missing {missing}; use another checkpoint "
            f"(ppg keeps the last run.keep_last) or re-save it"
        )
    from safetensors import safe_open

    vocab_rows = None
    try:
        for f in policy.glob("*.safetensors"):
            with safe_open(f, framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 - safe_open is not a dict
                    if key.endswith("embed_tokens.weight"):
                        vocab_rows = weights.get_slice(key).get_shape()[0]
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise CheckpointError(
            f"checkpoint {path}: weights are corrupt ({e}); use another checkpoint"
        ) from None
    tokenizer_size = _tokenizer_size(policy / "tokenizer.json")
    if vocab_rows is not None and tokenizer_size > vocab_rows:
        raise CheckpointError(
            f"checkpoint {path}: tokenizer has {tokenizer_size} tokens but the model's embedding has {vocab_rows} "
            "rows; the tokenizer belongs to another model (copy the matching tokenizer files into the folder)"
        )
    return policy


def _tokenizer_size(path: Path) -> int:
    try:
        data = json.loads(path.read_text())
        return len(data["model"]["vocab"]) + len(
            [t for t in data.get("added_tokens", []) if t["id"] >= len(data["model"]["vocab"])]
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid tokenizer.json ({e})") from None


def load_state(path: Path) -> tuple[dict, dict]:
    """(state.json, trainer_state) of a validated checkpoint."""
    try:
        state = json.loads((Path(path) / STATE).read_text())
        trainer_state = torch.load(Path(path) / TRAINER_STATE, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path}: trainer state is unreadable ({e}); use another checkpoint"
        ) from None
    return state, trainer_state
