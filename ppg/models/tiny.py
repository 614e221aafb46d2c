"""The embedded tiny Llama: spec -> config -> deterministically initialised model -> atomic HF folder.

A standard ``LlamaForCausalLM`` (not a custom class) so that transformers and vLLM both load it with
no remote code; float32 so that greedy decoding matches token for token between the two.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ppg.files import fsync_tree
from ppg.models.tokenizer import stop_token_ids

VLLM_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
"""Head sizes vLLM 0.32's CPU attention kernel accepts (``CPUAttentionBackend.get_supported_head_sizes``);
any other size builds fine in transformers but fails when a rollout worker starts its engine."""


class TinyModelSpec(BaseModel):
    """Shape of the tiny model; the defaults give ~1M parameters (fast on 2 CPU cores)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: PositiveInt = Field(
        default=1024, description="tokenizer size target (an upper bound: a small corpus yields fewer tokens)"
    )
    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt = Field(default=2, description="grouped-query attention: < num_heads")
    intermediate_size: PositiveInt = 384
    max_position_embeddings: PositiveInt = 1024
    rope_theta: float = Field(default=10000.0, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.hidden_size // self.num_heads not in VLLM_HEAD_SIZES:
            raise ValueError(
                f"head size hidden_size/num_heads = {self.hidden_size // self.num_heads} is not one vLLM's CPU "
                f"attention supports {VLLM_HEAD_SIZES}; change hidden_size or num_heads"
            )
        return self


def llama_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The HF config for ``spec``; vocabulary and special ids come from ``tokenizer`` so they cannot disagree.

    The embedding has exactly ``len(tokenizer)`` rows: with spare rows, sampling at temperature 1 could
    (rarely) pick an id that has no token, which detokenizers reject mid-rollout.
    """
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > spec.vocab_size {spec.vocab_size}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def init_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised float32 model; same spec + tokenizer -> bit-identical weights.

    The global RNG is forked so that building a model does not disturb the caller's random state.
    """
    config = llama_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = generation_config(tokenizer)
    return model


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Stop at ``<|end|>`` (or ``<|eos|>``); vLLM reads the same file and adds them as stop ids."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model_folder(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path | str,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write an HF folder (safetensors, config, generation config, tokenizer + chat template) atomically.

    Everything is written into a temporary sibling of ``out_dir`` and renamed into place, so a reader
    (or a crashed writer) never sees a half-written folder. An existing ``out_dir`` is moved aside
    first and removed after the rename (the swap itself is two renames; callers that race use a lock).
    ``extra_files`` (name -> text) are written into the folder before it is published.
    """
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        fsync_tree(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
