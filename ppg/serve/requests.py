"""A validated chat request -> the engine's job, with every deployment-dependent check that names a
field (model, limits, context length, field combinations) and the engine's own check of the sampling
parameters. Everything that can be the client's fault stops here, before the engine: an engine error
fails every request in the same engine step."""

from __future__ import annotations

from ppg.rollout.engine import CompletionRequest, SamplingRefused, VLLMEngine
from ppg.serve.errors import APIError
from ppg.serve.schemas import SEED_MAX, ChatCompletionRequest
from ppg.serve.settings import ServeSettings


def serves(settings: ServeSettings, model: str) -> bool:
    """The ids this app answers to: the model name, or the name with any version suffix (a client
    that pinned ``ppg-policy-v3`` is answered by the current version, which the reply names)."""
    return model == settings.model_name or model.startswith(f"{settings.model_name}-v")


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        404,
        f"model {model!r} is not served here; use {served!r} (see /v1/models)",
        "model",
        "model_not_found",
        type="not_found_error",
    )


def build_job(
    body: ChatCompletionRequest, settings: ServeSettings, engine: VLLMEngine, served: str
) -> tuple[CompletionRequest, int]:
    """(the engine's job, prompt tokens) or an ``APIError`` naming the field."""
    s = settings
    if not serves(s, body.model):
        raise model_not_found(body.model, served)
    if body.n > s.max_n:
        raise APIError(400, f"n={body.n} is over this server's limit of {s.max_n}", "n", "n_too_large")
    if body.seed is not None and body.seed + body.n - 1 > SEED_MAX:
        raise APIError(
            400, f"seed + n - 1 must be at most {SEED_MAX} (choice i samples with seed + i)", "seed"
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    max_tokens, field = body.requested_max_tokens()
    if max_tokens is not None and max_tokens > s.max_tokens_limit:
        raise APIError(
            400,
            f"{field}={max_tokens} is over this server's limit of {s.max_tokens_limit}",
            field,
            "max_tokens_too_large",
        )
    try:
        prompt = list(
            engine.tokenizer.apply_chat_template(
                [m.for_template() for m in body.messages],
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
            )
        )
    except Exception as e:  # templates raise on orders they do not accept
        raise APIError(400, f"the chat template refused these messages: {e}", "messages") from None
    room = s.max_model_len - len(prompt)
    if room < 1:
        raise APIError(
            400,
            f"the prompt is {len(prompt)} tokens; this model's context is {s.max_model_len}",
            "messages",
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(s.max_tokens_limit, room)
    elif max_tokens > room:
        raise APIError(
            400,
            f"prompt ({len(prompt)} tokens) + {field} ({max_tokens}) exceeds this model's "
            f"context of {s.max_model_len} tokens; lower {field}",
            field,
            "context_length_exceeded",
        )
    job = CompletionRequest(
        prompt,
        body.n,
        max_tokens,
        body.temperature,
        body.top_p,
        body.stop,
        body.seed,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
    )
    try:  # the engine's own check of the whole combination, before it can touch a step
        engine.sampling_params(job)
    except SamplingRefused as e:
        field = "top_logprobs" if e.field == "logprobs" else e.field
        raise APIError(400, f"the engine refuses this request: {e}", field, "invalid_sampling") from None
    return job, len(prompt)
