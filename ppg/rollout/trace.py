"""Token traces: each conversation's exact token sequence as the engine saw and wrote it.

Text is for the partner and the judge; the learner needs tokens. A trace grows turn by turn: the chat
template's new context (user line, role headers) is tokenised and appended, then the engine's sampled
reply ids are appended as they were sampled (never re-tokenised), marked as the agent's. Whatever
the template writes after a reply that the model did not sample (a newline after the end marker, or
the marker itself when the reply hit max_tokens) is context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ppg.episode import RenderError
from ppg.rollout.engine import Engine, Generation, SamplingSpec


@dataclass
class TokenTrace:
    ids: list[int] = field(default_factory=list)
    agent_mask: list[bool] = field(default_factory=list)
    token_turn: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # behaviour log-probs; 0.0 on context tokens
    text: str = ""  # the template rendering of everything in ``ids``
    turns: int = 0

    def add_context(self, tokenizer, text: str) -> None:
        if not text.startswith(self.text):
            raise RenderError(
                "the chat template is not prefix-stable (rendering a later turn changed earlier text); "
                "per-turn credit needs a template where each message appends text"
            )
        new = tokenizer.encode(text[len(self.text) :], add_special_tokens=False)
        self._append(new, agent=False, logprobs=[0.0] * len(new))
        self.text = text

    def add_reply(self, tokenizer, generation: Generation, content: str, closed_text: str) -> None:
        """Append the sampled ids as the agent's; ``closed_text`` renders the conversation through the
        reply (with ``content``, the reply as text). The end-of-turn text the template writes and the
        model did not sample is appended as context. Stray special tokens the model sampled inside its
        reply stay in the trace: the learner scores exactly what was sampled."""
        block = closed_text[len(self.text) :] if closed_text.startswith(self.text) else None
        if block is None or not block.startswith(content):
            raise RenderError(
                f"the chat template renders the reply as {block!r}, which does not start with the reply "
                f"{content!r}; the template must write the assistant's content verbatim"
            )
        suffix = block[len(content) :]
        sampled = tokenizer.decode(generation.token_ids, skip_special_tokens=False)
        emitted = max(k for k in range(len(suffix) + 1) if sampled.endswith(suffix[:k]))
        self._append(generation.token_ids, agent=True, logprobs=generation.logprobs)
        closing = tokenizer.encode(suffix[emitted:], add_special_tokens=False) if suffix[emitted:] else []
        self._append(closing, agent=False, logprobs=[0.0] * len(closing))
        self.text = closed_text
        self.turns += 1

    def _append(self, ids: list[int], agent: bool, logprobs: list[float]) -> None:
        self.ids += ids
        self.agent_mask += [agent] * len(ids)
        self.token_turn += [self.turns] * len(ids)
        self.logprobs += logprobs


class TokenPolicy:
    """A ``run_conversations`` policy over a token-level engine, keeping one trace per conversation."""

    def __init__(
        self,
        engine: Engine,
        sampling: SamplingSpec,
        max_model_len: int | None = None,
        seeds: list[int] | None = None,
    ) -> None:
        self.engine, self.sampling, self.max_model_len = engine, sampling, max_model_len
        self.tokenizer = engine.tokenizer
        self.traces: list[TokenTrace] = []
        self.seeds = seeds  # per conversation; turn t samples with seed + 7919 * t

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        if not self.traces:
            self.traces = [TokenTrace() for _ in conversations]
        for trace, messages in zip(self.traces, conversations, strict=True):
            trace.add_context(self.tokenizer, self._render(messages, add_generation_prompt=True))
            if self.max_model_len and len(trace.ids) + self.sampling.max_tokens > self.max_model_len:
                raise RenderError(
                    f"conversation of {len(trace.ids)} tokens + rollout.max_tokens_per_turn={self.sampling.max_tokens} "
                    f"exceeds model.max_model_len={self.max_model_len}; shorten problem.num_turns or raise the limit"
                )
        turn = self.traces[0].turns
        seeds = None if self.seeds is None else [(s + 7919 * turn) % 2**31 for s in self.seeds]
        generations = self.engine.generate([t.ids for t in self.traces], self.sampling, seeds)
        replies = []
        for trace, messages, generation in zip(self.traces, conversations, generations, strict=True):
            reply = self.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
            closed = self._render(
                [*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False
            )
            trace.add_reply(self.tokenizer, generation, reply, closed)
            replies.append(reply)
        return replies

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
