"""Checkpoints: a Hugging Face policy folder plus the trainer state needed to continue *exactly*.

Layout of ``RUN_DIR/checkpoints/iter_000010/``::

    policy/             config.json, model.safetensors, generation_config.json, tokenizer files
    adapter/            learner.lora only: the LoRA adapters (policy/ holds them merged)
    trainer_state.pt    optimizer, LR scheduler, RNG states (tensors and numbers only)
    state.json          iteration, policy version, data cursor
    config.yaml         the resolved config of the run

Written into a hidden temporary folder, flushed to disk, and renamed into place, so a crash (or a
power cut) mid-write leaves the previous checkpoint as the latest complete one; folders leave the
same way they come (renamed to a hidden name, then deleted), so a half-deleted checkpoint is never
visible. ``latest_checkpoint`` still validates and skips a damaged one (disk corruption, a copy
gone wrong) with a warning: a run resumes from the newest checkpoint that is intact.
Trainer state loads with ``weights_only=True``; weights only from safetensors, checked against the
model's config (tensor names and shapes) before any engine sees them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ppg.config import PPGConfig
from ppg.files import fsync_dir, fsync_tree
from ppg.learner.lora import ADAPTER, is_lora, save_policy
from ppg.weights import tensor_shapes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

POLICY, TRAINER_STATE, STATE, CONFIG = "policy", "trainer_state.pt", "state.json", "config.yaml"


log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the folder, what is wrong, and the fix."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | str | Path,
    trainer_state: dict,
    state: dict,
    config: PPGConfig,
) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".iter_{iteration:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(model, tmp / POLICY)  # weights (LoRA: merged), config, generation_config
    if is_lora(model):  # the adapters themselves: a resumed learner continues them exactly
        model.save_pretrained(tmp / ADAPTER)
    # The tokenizer as transformers writes it (not copied files): the same for a local folder of
    # any layout and for a hub model, whose files are nowhere under a path ppg knows.
    from transformers import AutoTokenizer, PreTrainedTokenizerBase  # lazy: checks stay fast

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    tokenizer.save_pretrained(tmp / POLICY)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    (tmp / STATE).write_text(json.dumps(state, indent=2))
    (tmp / CONFIG).write_text(config.to_yaml())
    fsync_tree(tmp)  # the data is on disk before the rename makes it visible
    if final.exists():  # re-saving the same iteration (e.g. the final one): swap it whole
        old = root / f".iter_{iteration:06d}.old-{os.getpid()}"
        os.rename(final, old)  # a crash right here is repaired by _restore_swapped
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    root = checkpoint_dir(run_dir)
    _restore_swapped(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        trash = root / f".{old.name}.del-{os.getpid()}"
        os.rename(old, trash)  # gone at once: a kill during rmtree leaves no half checkpoint behind
        shutil.rmtree(trash, ignore_errors=True)
    leftovers = [*root.glob(".iter_*.tmp-*"), *root.glob(".iter_*.old-*"), *root.glob(".iter_*.del-*")]
    for stale in leftovers:  # of interrupted writes and deletions
        shutil.rmtree(stale, ignore_errors=True)


def _restore_swapped(root: Path) -> None:
    """A crash between the two renames of a re-save leaves ``.iter_N.old-PID`` and no ``iter_N``:
    put the old (complete) folder back."""
    if not root.is_dir():
        return
    for old in sorted(root.glob(".iter_*.old-*")):
        final = root / old.name[1:].split(".old-")[0]
        if not final.exists():
            os.rename(old, final)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    return sorted(p for p in root.glob("iter_*") if p.is_dir()) if root.is_dir() else []


def require_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first (a rename a crash interrupted is finished first); an error
    naming the fix when there are none. Cheap: no weights are read."""
    _restore_swapped(checkpoint_dir(run_dir))
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointError(
            f"{run_dir} has no checkpoints (expected {checkpoint_dir(run_dir)}/iter_*); "
            "pass the folder of a run that saved at least one (run.checkpoint_every)"
        )
    return checkpoints


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint that passes ``validate_checkpoint``; newer damaged ones are skipped with
    a warning (a resumed run then redoes their iterations, exactly)."""
    checkpoints = require_checkpoints(run_dir)
    problems = []
    for candidate in reversed(checkpoints):
        try:
            validate_checkpoint(candidate)
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint: %s", e)
            problems.append(str(e))
            continue
        return candidate
    raise CheckpointError(
        f"{run_dir}: none of its {len(checkpoints)} checkpoints is usable: " + "; ".join(problems)
    )


def validate_checkpoint(path: Path, require_trainer_state: bool = True) -> Path:
    """Refuse a checkpoint that is incomplete, corrupt, pickled, or whose tokenizer does not fit."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    policy = path / POLICY if (path / POLICY).is_dir() else path
    tokenizer = "tokenizer.json" if (policy / "tokenizer.json").is_file() else "tokenizer_config.json"
    needed = ["config.json", tokenizer] + (
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
    try:
        shapes = tensor_shapes(policy)
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise CheckpointError(
            f"checkpoint {path}: weights are corrupt ({e}); use another checkpoint"
        ) from None
    vocab_rows = next((v[0] for k, v in shapes.items() if k.endswith("embed_tokens.weight")), None)
    tokenizer_size = _tokenizer_size(policy / "tokenizer.json") if tokenizer == "tokenizer.json" else 0
    if vocab_rows is not None and tokenizer_size > vocab_rows:
        raise CheckpointError(
            f"checkpoint {path}: tokenizer has {tokenizer_size} tokens but the model's embedding has {vocab_rows} "
            "rows; the tokenizer belongs to another model (copy the matching tokenizer files into the folder)"
        )
    _check_tensors(path, policy, shapes)
    return policy


def _check_tensors(path: Path, policy: Path, found: dict[str, tuple[int, ...]]) -> None:
    """The weights' names and shapes must be the ones config.json describes. Without this check a
    tensor of the wrong shape fails deep inside vLLM or transformers (or, for a missing one, is
    silently initialised at random by transformers). The model is built on the meta device: no
    memory, no code from the folder (``trust_remote_code`` stays off; such models are not checked)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(policy, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        if "trust_remote_code" in str(e):
            return  # custom code: its own loader is the only judge of its weights
        raise CheckpointError(
            f"checkpoint {path}: config.json does not describe a causal language model ({e})"
        ) from None
    params = model.state_dict(keep_vars=True)
    expected = {k: tuple(v.shape) for k, v in params.items()}
    wrong = [
        f"{k} {found[k]} (config wants {expected[k]})"
        for k in found
        if k in expected and found[k] != expected[k]
    ]
    present = {id(params[k]) for k in found if k in params}  # tied weights share one tensor
    missing = [k for k in expected if k not in found and id(params[k]) not in present]
    if wrong or missing:
        detail = (f"wrong shapes: {wrong[:3]}" if wrong else "") + (
            f"{'; ' if wrong else ''}missing tensors: {missing[:3]}" if missing else ""
        )
        raise CheckpointError(
            f"checkpoint {path}: weights do not match config.json ({detail}); the weights and the "
            "config come from different models: save them together with save_pretrained()"
        )


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
