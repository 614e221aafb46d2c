"""LoRA adapters (peft) on the learner, invisible to everything downstream.

Only the learner knows about adapters. Rollout workers, the HTTP replicas and every checkpoint's
``policy/`` folder get one plain model: the base weights plus each adapter's delta, computed without
touching the base (peft's merge/unmerge in place would add and subtract in floating point every
iteration and drift the base). A checkpoint also keeps the adapters themselves (``adapter/``), so a
resumed learner rebuilds exactly base + adapters, not a new adapter on merged weights.

peft is imported only when a run asks for LoRA (``learner.lora``; the extra ``ppg[lora]``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ppg.config import LoraSettings

ADAPTER = "adapter"  # the checkpoint's adapter folder, beside policy/


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Freeze ``model`` and wrap it with fresh adapters (B = 0: the same function as before)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_lora(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """``base`` (the initial policy) with a checkpoint's adapters, trainable: a resumed learner."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir}: no LoRA adapters in this checkpoint (it was saved by a run without "
            "learner.lora); resume it without learner.lora, or start a new run"
        )
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)


def policy_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The weights every engine loads, under the base model's own names, on the CPU (in ``dtype``
    when given): for a LoRA model each adapted weight is ``W + delta`` (peft's own delta, scaling
    included); otherwise the model's own tensors, which may share memory with the model: serialize
    them (``ray.put``) or copy them before the next optimizer step."""
    if not is_lora(model):
        return {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {
        f"{name}.weight": module.get_delta_weight(module.active_adapters[0])
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer)
    }
    merged = {}
    with torch.no_grad():
        for key, value in base.state_dict().items():
            if "lora_" in key:
                continue
            name = key.replace(".base_layer.", ".")
            merged[name] = (
                (value + deltas[name].to(value.dtype) if name in deltas else value).detach().cpu().clone()
            )
    return merged


def save_policy(model: torch.nn.Module, folder: Path) -> None:
    """A plain Hugging Face folder any engine loads (merged weights for a LoRA model)."""
    if not is_lora(model):
        model.save_pretrained(folder, safe_serialization=True)
        return
    model.get_base_model().save_pretrained(
        folder, state_dict=policy_state_dict(model), safe_serialization=True
    )


def trainable_share(model: torch.nn.Module) -> float:
    """Trainable parameters / all parameters (1.0 without LoRA): printed when the learner starts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(1, total)
