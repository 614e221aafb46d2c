"""A local Hugging Face model folder laid out as a real chat model ships, not as the embedded one:
another architecture (Qwen2), ChatML special tokens and chat template, weights in several
safetensors shards with an index, an embedding padded past the tokenizer, an end-of-turn marker as
the only stop token. Random weights:
the tests check the plumbing (load, train, checkpoint, resume, evaluate, serve), not the answers."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_model_folder(folder: Path, tokenizer_source: str) -> Path:
    """Build the folder from ``tokenizer_source``'s vocabulary (so the problems' words are tokens)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.eos_token = "<|im_end|>"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        # padded past the tokenizer, as real models ship (Qwen2.5: 151936 rows for 151665 tokens);
        # transformers also adds Qwen2's own unknown token when it loads this folder
        vocab_size=(len(tokenizer) // 64 + 1) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: one vLLM's CPU kernels take
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=end,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[end], pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="200KB")
    tokenizer.save_pretrained(folder)
    return folder
