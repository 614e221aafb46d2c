"""Byte-level BPE tokenizer for the embedded tiny model, trained on the project's own corpus.

Why our own: the default policy must be buildable offline and deterministically, so no hub tokenizer.
Byte-level BPE never meets an unknown character, so any text a user types still tokenizes.

Chat format (one template shared by transformers, vLLM and our SFT/loss masks)::

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

The model ends its turn by emitting ``<|end|>``; generation stops there (see ``STOP_TOKENS``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END)
"""Fixed order, so special ids are the same for every corpus (pad=0, bos=1, eos=2, ..., end=6)."""
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
STOP_TOKENS: tuple[str, ...] = (END, EOS)
"""Tokens that end generation: ``<|end|>`` closes an assistant turn; ``<|eos|>`` as a safety net."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

Message = Mapping[str, str]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it with special tokens and the chat template.

    Deterministic for the same texts: the BPE trainer breaks ties by pair order, and the special
    tokens are added first in a fixed order. ``vocab_size`` counts the 256 byte symbols and the specials;
    a small corpus may yield fewer tokens, never more.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(
            f"vocab_size {vocab_size} too small: need > {256 + len(SPECIAL_TOKENS)} (bytes + specials)"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(bpe)


def wrap_tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """Give a raw ``tokenizers.Tokenizer`` the transformers interface: specials, padding, chat template.

    No post-processor adds ``<|bos|>``: the chat template writes it, so it is never doubled.
    Right padding keeps position ids equal to those vLLM uses when the learner scores a batch.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END],
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def conversation_texts(conversations: Iterable[Sequence[Message]]) -> Iterable[str]:
    """The message contents of ``conversations``: what the tokenizer is trained on."""
    for conversation in conversations:
        for message in conversation:
            yield message["content"]


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids that end a generated turn, for generation_config / vLLM ``stop_token_ids``."""
    return [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]


def encode_conversation(
    tokenizer: PreTrainedTokenizerFast, messages: Sequence[Message]
) -> tuple[list[int], list[int]]:
    """Token ids of ``messages`` rendered by the chat template, and a 0/1 mask of assistant tokens.

    The mask covers each assistant message's content and its closing ``<|end|>`` (what the model must
    produce), not the ``<|assistant|>`` marker (the template writes it). Built message by message,
    which equals tokenizing the rendered template because special tokens split the text before BPE;
    tests check the equality.
    """
    ids = [tokenizer.bos_token_id]
    mask = [0]
    end_id = tokenizer.convert_tokens_to_ids(END)
    for message in messages:
        role = message["role"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown role {role!r}; use one of {sorted(ROLE_TOKENS)}")
        body = tokenizer.encode(message["content"], add_special_tokens=False) + [end_id]
        ids += [tokenizer.convert_tokens_to_ids(ROLE_TOKENS[role])] + body
        mask += [0] + [int(role == "assistant")] * len(body)
    return ids, mask
