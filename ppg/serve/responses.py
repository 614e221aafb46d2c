"""OpenAI response objects built from the engine's deltas: one ``Reply`` per request gathers them
into a whole ``chat.completion``, or turns each into ``chat.completion.chunk`` SSE events as it
arrives (so a streamed reply leaves the server token by token). Kept out of ``app.py`` so the server
class reads as the request path."""

from __future__ import annotations

import math
import time
import uuid

from ppg.rollout.engine import CompletionDelta
from ppg.rollout.engine import TokenLogprob as EngineLogprob
from ppg.serve.errors import APIError
from ppg.serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM's own server uses the same floor


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR) if math.isfinite(logprob) else LOGPROB_FLOOR


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def openai_logprobs(entries: list[EngineLogprob], top: int) -> list[TokenLogprob]:
    """The engine's per-token log-probs in OpenAI's shape, ``top`` alternatives each (rank order)."""
    return [
        TokenLogprob(
            token=e.token,
            logprob=_finite(e.logprob),
            bytes=_utf8(e.token),
            top_logprobs=[
                TopLogprob(token=t, logprob=_finite(lp), bytes=_utf8(t))
                for t, lp, rank in e.top
                if rank <= top
            ],
        )
        for e in entries
    ]


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def error_event(error: APIError) -> str:
    """An error inside a stream that already answered 200: OpenAI's clients raise on it."""
    detail = ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code)
    return sse(ErrorResponse(error=detail).model_dump_json())


class Reply:
    """One request's answer. ``top_logprobs`` is None when the client did not ask for log-probs."""

    def __init__(
        self, n: int, prompt_tokens: int, model: str, fingerprint: str, top_logprobs: int | None
    ) -> None:
        self.n, self.prompt_tokens, self.top_logprobs = n, prompt_tokens, top_logprobs
        self.base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": fingerprint,
        }
        self.texts = [""] * n
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.completion_tokens = 0

    def _logprobs(self, delta: CompletionDelta) -> list[TokenLogprob] | None:
        if self.top_logprobs is None or delta.logprobs is None:
            return None
        return openai_logprobs(delta.logprobs, self.top_logprobs)

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )

    # ---- whole ---------------------------------------------------------------------------------
    def add(self, deltas: list[CompletionDelta]) -> None:
        for d in deltas:
            self.texts[d.index] += d.text
            self.completion_tokens += len(d.token_ids)
            self.logprobs[d.index] += self._logprobs(d) or []
            self.finish[d.index] = d.finish_reason or self.finish[d.index]

    def completion(self) -> ChatCompletion:
        def logprobs(i: int) -> ChoiceLogprobs | None:
            return None if self.top_logprobs is None else ChoiceLogprobs(content=self.logprobs[i])

        return ChatCompletion(
            **self.base,
            choices=[
                Choice(
                    index=i,
                    message=AssistantMessage(content=self.texts[i]),
                    finish_reason=self.finish[i] or "length",
                    logprobs=logprobs(i),
                )
                for i in range(self.n)
            ],
            usage=self.usage(),
        )

    # ---- streamed ------------------------------------------------------------------------------
    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(**self.base, choices=choices, usage=usage)
        return sse(chunk.model_dump_json(exclude=None if usage else {"usage"}))

    def opening(self) -> list[str]:
        """Each choice's first chunk (the role), sent before any token so the client knows it is on."""
        return [
            self._chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            for i in range(self.n)
        ]

    def chunks(self, deltas: list[CompletionDelta]) -> list[str]:
        """One engine step's deltas as chunks: the text (with its log-probs), then, on a choice's last
        delta, a chunk with its finish reason."""
        events = []
        for d in deltas:
            self.completion_tokens += len(d.token_ids)
            logprobs = self._logprobs(d)
            if d.text or logprobs:
                lp = None if logprobs is None else ChoiceLogprobs(content=logprobs)
                events.append(
                    self._chunk([ChunkChoice(index=d.index, delta=Delta(content=d.text), logprobs=lp)])
                )
            if d.finish_reason is not None:
                events.append(
                    self._chunk([ChunkChoice(index=d.index, delta=Delta(), finish_reason=d.finish_reason)])
                )
        return events

    def usage_chunk(self) -> str:
        """``stream_options.include_usage``: the last chunk, with no choices and the usage."""
        return self._chunk([], self.usage())
