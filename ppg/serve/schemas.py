"""OpenAI-compatible request and response shapes for ``ppg serve`` (the subset the policy supports).

Requests forbid unknown roles and validate bounds that do not depend on the deployment (types, ranges,
text that is valid Unicode, a seed the engine's 64-bit generator accepts); bounds that do (``max_tokens``,
``n``, context length) are checked by the app against ``ServeSettings`` so the error can name the
configured limit. Whatever reaches the engine must not be able to fail there: an engine error fails
every request fused into the same batch, so a client mistake has to stop here. Responses carry ``system_fingerprint = "ppg-v<version>"``:
the policy version that produced them.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SEED_MAX = 2**63 - 1
"""vLLM seeds a ``torch.Generator`` per request (a signed 64-bit integer; choice ``i`` of ``n`` uses
``seed + i``). A larger seed fails inside the engine step, not at submission."""


def _unicode(text: str, field: str) -> str:
    """Refuse lone UTF-16 surrogates (``"\\ud800"`` is valid JSON): the tokenizer cannot encode them and
    would fail with a message that names neither the field nor the cause."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{field} must be valid Unicode text; position {e.start} holds a lone surrogate "
            f"({text[e.start]!r}): send the character as a UTF-16 surrogate pair or as UTF-8"
        ) from None
    return text


class ChatMessage(BaseModel):
    """One message. A persona is given as the ``system`` message."""

    model_config = ConfigDict(extra="ignore", strict=True)  # "1" is not a number, [..] not a string

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content_text(cls, v: str) -> str:
        return _unicode(v, "content")


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send fields we do not use (user, ...); strict: the types the schema documents,
    # so "max_tokens": "5" or "stream": "yes" is a 400 naming the field, not a silent coercion
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(default="ppg-policy", min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="newer name of max_tokens")
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(
        default=None, ge=-(2**63), le=SEED_MAX, description="a signed 64-bit integer (seed + n - 1 too)"
    )
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return [_unicode(s, "stop") for s in stops]

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(value, field name): ``max_completion_tokens`` wins when both are given."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ppg"
    root: str  # the checkpoint / policy folder the deployment started from
    policy_version: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error | authentication_error | not_found_error | server_error
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    policy_version: int
    model: str
    replica: str
    in_flight: int
