"""OpenAI-compatible request and response shapes for ``ppg serve`` (the subset the policy supports).

Requests forbid unknown fields (a field the server would ignore is a 400 naming it) and unknown
roles, and validate bounds that do not depend on the deployment (types, ranges, text that is valid
Unicode, a seed the engine's 64-bit generator accepts); bounds that do (``max_tokens``, ``n``,
context length) are checked by the app against ``ServeSettings`` so the error can name the
configured limit. Whatever reaches the engine must not be able to fail there: an engine error fails
every request in the same engine step, so a client mistake has to stop here. Responses carry
``system_fingerprint = "ppg-v<version>"``: the policy version that produced them.
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


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


def _content(v: object) -> object:
    """A string or a list of text parts; any other part (image_url, input_audio, file, ...) is refused
    naming its position: the policy reads text only, and dropping a part would change the question."""
    if isinstance(v, str):
        return _unicode(v, "content")
    if not isinstance(v, list):
        raise ValueError("content must be a string or a list of text parts [{'type': 'text', 'text': ...}]")
    for i, part in enumerate(v):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"a part of type {kind!r}" if isinstance(kind, str) else "not a content part"
            raise ValueError(
                f"content[{i}] is {what}; this server takes only text parts {{'type': 'text', 'text': ...}}"
            )
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content[{i}].text must be a string")
        _unicode(part["text"], f"content[{i}].text")
    return v


class ChatMessage(BaseModel):
    """One message. A persona is given as the ``system`` message; ``developer`` (OpenAI's name for
    system instructions on newer models) is rendered as ``system``. ``content`` is a string or a list
    of text parts, joined with newlines (as vLLM's own server does)."""

    model_config = ConfigDict(extra="ignore", strict=True)  # "1" is not a number, [..] not a string

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, v: object) -> object:
        return _content(v)

    def for_template(self) -> dict[str, str]:
        """The message as the chat template takes it."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(default=False, description="a last chunk (no choices) with the usage")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"] = Field(description="only text: json_object / json_schema are refused (400)")


def _response_format(v: object) -> object:
    if isinstance(v, dict) and v.get("type") in ("json_object", "json_schema"):
        raise ValueError(
            f"{v['type']!r} is not supported: this server answers text only ({{'type': 'text'}})"
        )
    return v


class ChatCompletionRequest(BaseModel):
    """The fields this server honours. Any other field is a 400 naming it (``unsupported_parameter``:
    tools, tool_choice, functions, logit_bias, audio, ...), as OpenAI answers an unknown argument, so
    a client never gets a reply that silently ignored what it asked for. ``user`` is accepted and
    ignored (an end-user id for abuse monitoring; it does not change the reply)."""

    # strict: the types the schema documents, so "max_tokens": "5" or "stream": "yes" is a 400 naming
    # the field, not a silent coercion
    model_config = ConfigDict(extra="forbid", strict=True)

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
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    logprobs: bool = Field(
        default=False, description="log-probs of the sampled tokens (raw model distribution)"
    )
    top_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="alternatives per token; needs logprobs: true"
    )
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = Field(default=None, description="only with stream: true")
    user: str | None = Field(default=None, description="accepted and ignored")

    @field_validator("response_format", mode="before")
    @classmethod
    def _text_only(cls, v: object) -> object:
        return _response_format(v)

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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's text as UTF-8 (a partial character decodes as U+FFFD)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only with stream_options.include_usage: null, then on the last chunk


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
