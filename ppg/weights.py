"""Policy weights as they travel: a state dict (Hugging Face names) or a checkpoint folder, and the
check that they belong to the running model before any engine loads them.

Why a check of its own: vLLM 0.32 reloads weights through meta tensors, so a tensor of the wrong
shape found halfway leaves the engine unable to generate at all (measured: every later request
fails). One bad update would take a rollout worker or a serving replica down; refused up front, it
changes nothing and the caller gets an error that names the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


@dataclass(frozen=True)
class SharedWeights:
    """A state dict already in the Ray object store, with its tensor shapes.

    Why: an ObjectRef passed as a call's argument is fetched and deserialized by the callee, so a
    pool that only forwards the weights to its workers used to receive the whole state dict and put
    it into the object store again (a full copy per update, growing with the model). Wrapped here it
    is not fetched: the pool checks the shapes and hands the same object to every worker."""

    ref: Any  # ray.ObjectRef of {name: tensor}
    shapes: Mapping[str, tuple[int, ...]]


# a state dict (HF names), a checkpoint folder, or a state dict in the object store
Weights = Mapping[str, torch.Tensor] | str | Path | SharedWeights


class WeightsMismatch(ValueError):
    """Weights of another model (names or shapes): refused before the engine sees them."""


def tensor_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a folder's safetensors, from the headers only (no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open is not a dict
                shapes[key] = tuple(weights.get_slice(key).get_shape())
    return shapes


def shapes_of(weights: Weights) -> dict[str, tuple[int, ...]]:
    if isinstance(weights, SharedWeights):
        return dict(weights.shapes)
    if isinstance(weights, (str, Path)):
        return tensor_shapes(weights)
    return {k: tuple(v.shape) for k, v in weights.items()}


def check_weights_fit(expected: Mapping[str, tuple[int, ...]], weights: Weights, what: str) -> None:
    """Raise WeightsMismatch unless ``weights`` match ``expected`` (the running model's shapes)
    wherever a name is shared, and share at least one name. ``what`` names them in the error."""
    incoming = shapes_of(weights)
    wrong = [
        f"{k} {s} (running: {expected[k]})" for k, s in incoming.items() if k in expected and s != expected[k]
    ]
    if wrong or not set(incoming) & set(expected):
        detail = f"wrong shapes {wrong[:3]}" if wrong else "no tensor name matches the running model"
        raise WeightsMismatch(f"{what} does not fit the running model ({detail}); nothing was changed")
