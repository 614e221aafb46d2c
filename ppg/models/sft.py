"""Supervised warm start: teach the fresh tiny model the chat format and the corpus' replies.

Policy-gradient RL from random weights would spend its whole budget learning to emit ``<|end|>``;
a short SFT on scripted dialogues gives a policy that already talks, so RL only has to shape *which*
replies it gives. The loss is next-token prediction on assistant tokens only (content + closing
``<|end|>``): system/user tokens are context, exactly as in the policy-gradient loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from ppg.models.tokenizer import Message, encode_conversation

IGNORE_INDEX = -100
"""Label value the HF loss skips (``torch.nn.functional.cross_entropy``'s default ``ignore_index``)."""


class SFTSpec(BaseModel):
    """Warm-start settings; the defaults finish in about 6 minutes on 2 CPU cores. Fewer steps leave
    the model unable to copy a word from its context (the stated taste, its persona's facts), which
    every problem's reward depends on: 300 steps gave P(stated item) at chance, 1200 gave 0.33."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: PositiveInt = 1200
    batch_size: PositiveInt = 16
    learning_rate: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: NonNegativeInt = 20
    max_length: PositiveInt = Field(default=512, description="longer conversations are truncated")
    seed: int = 0


class SFTResult(BaseModel):
    """The loss curve (mean assistant-token cross-entropy per step) and the wall time."""

    losses: list[float]
    seconds: float

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]


def build_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, assistant mask) pairs into ``input_ids``, ``attention_mask`` and ``labels``.

    ``labels`` equals ``input_ids`` on assistant tokens and ``IGNORE_INDEX`` elsewhere (prompt, role
    markers, padding); the model shifts them by one internally.
    """
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, L]
    attention = torch.zeros((len(examples), width), dtype=torch.long)  # [B, L]
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    for row, (ids, mask) in enumerate(examples):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        attention[row, :n] = 1
        keep = torch.tensor(mask, dtype=torch.bool)
        labels[row, :n] = torch.where(keep, torch.tensor(ids), IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def encode_all(
    tokenizer: PreTrainedTokenizerFast, conversations: Sequence[Sequence[Message]], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Encode every conversation (truncated to ``max_length``); drop those with no assistant token left."""
    examples = []
    for conversation in conversations:
        ids, mask = encode_conversation(tokenizer, conversation)
        ids, mask = ids[:max_length], mask[:max_length]
        if any(mask[1:]):
            examples.append((ids, mask))
    if not examples:
        raise ValueError("no conversation has an assistant message: nothing to learn from")
    return examples


def train_sft(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    conversations: Sequence[Sequence[Message]],
    spec: SFTSpec | None = None,
    progress: bool = True,
) -> SFTResult:
    """Fine-tune ``model`` in place on the assistant turns of ``conversations``; return the loss curve.

    Deterministic for the same inputs and seed: batches are drawn with a private ``torch.Generator``
    and dropout is off in the tiny config, so the only randomness is the seeded data order. Batches
    are bucketed by length (see ``length_bucketed_batches``) to spend little compute on padding.
    """
    spec = spec or SFTSpec()
    examples = encode_all(tokenizer, conversations, spec.max_length)
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay, betas=(0.9, 0.95)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, spec))
    batches: list[list[int]] = []
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(spec.steps), desc="sft warm start", disable=not progress, leave=False)
    for _ in bar:
        if not batches:  # a new epoch
            batches = length_bucketed_batches([len(ids) for ids, _ in examples], spec.batch_size, generator)
        batch = build_batch([examples[i] for i in batches.pop()], tokenizer.pad_token_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return SFTResult(losses=losses, seconds=time.perf_counter() - start)


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """One epoch of index batches whose members have similar lengths, in random order.

    Conversations range from ~50 to ~400 tokens; random batches would be mostly padding. Shuffled
    indices are sorted by length within pools of 16 batches, cut into batches, and the batches shuffled,
    so every example is seen once per epoch and batch order stays random (and seeded).
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = batch_size * 16
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _lr_factor(step: int, spec: SFTSpec) -> float:
    """Linear warmup then cosine decay to 10%: stable for a fresh model with a high learning rate."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
