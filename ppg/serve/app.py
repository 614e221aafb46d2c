"""``ppg serve``: the policy behind an OpenAI-compatible HTTP API, on Ray Serve.

One deployment (``PolicyServer``), one vLLM engine per replica, FastAPI ingress:

* ``POST /v1/chat/completions`` - chat through the model's chat template; a persona is the system
  message. ``stream: true`` answers with SSE ``data: {chunk}`` lines and ``data: [DONE]``. Streaming
  here generates the whole reply first and then sends it token by token (the engine is the
  synchronous ``vllm.LLM``), so the first byte arrives when the reply is complete.
* ``GET /v1/models`` - one model, ``<model_name>-v<version>``.
* ``GET /healthz`` - version, replica, in-flight requests (no auth: for probes).

Every response names the policy version that produced it: ``system_fingerprint = "ppg-v<version>"``
and the ``x-ppg-policy-version`` header. Client mistakes are 4xx in OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``) naming the field; never 500.

Concurrent requests on a replica are fused into one ``generate`` call (``serve.batch``) run in a
worker thread, so the event loop keeps accepting. A reload takes the write side of a readers-writer
lock: it waits for in-flight batches and holds new ones back until the weights are switched, so no
request is dropped and each is answered entirely by one version. How a reload reaches every
replica: ``ppg/policy_registry.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ppg.rollout.engine import Completion, CompletionRequest, SamplingRefused
from ppg.serve.errors import APIError, documented, install_error_handlers
from ppg.serve.schemas import (
    SEED_MAX,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Health,
    ModelCard,
    ModelList,
    Usage,
)
from ppg.serve.settings import ServeSettings
from ppg.weights import check_weights_fit, tensor_shapes

logger = logging.getLogger("ppg.serve")
VERSION_HEADER = "x-ppg-policy-version"


app = FastAPI(title="ppg policy (OpenAI-compatible)")
install_error_handlers(app)


@app.middleware("http")
async def _version_header(request: Request, call_next):
    """Every response (errors included) names the version the replica serves."""
    response = await call_next(request)
    server = getattr(request.app.state, "server", None)  # the replica's own copy of app
    if server is not None and VERSION_HEADER not in response.headers:
        response.headers[VERSION_HEADER] = str(server.version)
    return response


class ReadWriteLock:
    """Many readers (generate batches) or one writer (a reload); a waiting writer blocks new readers,
    so a reload is never starved by a steady stream of requests."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @asynccontextmanager
    async def read(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def write(self):
        async with self._cond:
            self._writers_waiting += 1
            await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


# A request's sampling job and its samples are the engine's own types: the engine does the sampling.
Job = CompletionRequest
Sample = Completion


@dataclass
class JobResult:
    version: int
    samples: list[Sample]


def _usage(prompt_tokens: int, samples: list[Sample]) -> Usage:
    completion = sum(len(s.token_ids) for s in samples)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
    )


# Everything the class uses must be defined above it: Serve pickles it when the decorator runs.
@serve.deployment
@serve.ingress(app)
class PolicyServer:
    def __init__(self, settings: dict, deploy_id: str = "local") -> None:
        from ppg.learner.checkpoint import validate_checkpoint
        from ppg.rollout.engine import EngineConfig, VLLMEngine

        self.settings = ServeSettings.model_validate(settings)
        s = self.settings
        self.policy_dir = validate_checkpoint(Path(s.checkpoint), require_trainer_state=False)
        self.version = s.initial_version(self.policy_dir)
        self.deploy_id = deploy_id
        self.engine = VLLMEngine(
            self.policy_dir,
            EngineConfig(
                dtype=s.dtype,
                max_model_len=s.max_model_len,
                kv_cache_gib=s.kv_cache_gib,
                trust_remote_code=s.trust_remote_code,
                seed=s.seed,
            ),
        )
        self.tokenizer = self.engine.tokenizer
        self._probe_prompt = list(  # the health probe's prompt (see _engine_answers)
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}],
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
            )
        )
        self._shapes = tensor_shapes(self.policy_dir)  # what a reload must match
        self._api_key = s.api_key()
        self._lock = ReadWriteLock()
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ppg-engine"
        )  # vLLM is not thread-safe
        self._in_flight = 0
        self._engine_failure: str | None = None  # set when a generate call raised: see _generate_batch
        self._created = int(time.time())
        self._generate_batch.set_max_batch_size(s.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        try:
            context = serve.get_replica_context()
            self.replica, self.app_name = context.replica_id.unique_id, context.app_name
        except Exception:  # constructed outside Serve (tests of the class itself)
            self.replica, self.app_name = "local", s.app_name
        self._registry = None
        self._poller: asyncio.Task | None = None
        self._join_lock = asyncio.Lock()
        app.state.server = self
        logger.info("replica %s serves %s as version %d", self.replica, self.policy_dir, self.version)

    # ---- HTTP ----------------------------------------------------------------------------------
    @app.get("/healthz", response_model=None, responses={200: {"model": Health}, **documented(503)})
    async def healthz(self) -> JSONResponse:
        self._check_engine()
        await self._ensure_poller()
        body = Health(
            policy_version=self.version,
            model=self.model_id(),
            replica=self.replica,
            in_flight=self._in_flight,
        )
        return JSONResponse(body.model_dump(), headers={VERSION_HEADER: str(self.version)})

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **documented(401)})
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        await self._ensure_poller()
        card = ModelCard(
            id=self.model_id(),
            created=self._created,
            root=str(self.settings.checkpoint),
            policy_version=self.version,
        )
        return JSONResponse(ModelList(data=[card]).model_dump(), headers={VERSION_HEADER: str(self.version)})

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={
            200: {"model": ChatCompletion, "content": {"text/event-stream": {}}},
            **documented(400, 401, 404, 503),
        },
    )
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._authorize(request)
        self._check_engine()
        await self._ensure_poller()
        job, prompt_tokens = self._job(body)
        self._in_flight += 1
        try:
            result: JobResult = await self._generate_batch(job)
        finally:
            self._in_flight -= 1
        model = self.model_id(result.version)
        fingerprint = f"ppg-v{result.version}"
        headers = {VERSION_HEADER: str(result.version)}
        if body.stream:
            return StreamingResponse(
                self._sse(result, model, fingerprint), media_type="text/event-stream", headers=headers
            )
        completion = ChatCompletion(
            model=model,
            system_fingerprint=fingerprint,
            choices=[
                Choice(index=i, message=AssistantMessage(content=s.text), finish_reason=s.finish_reason)
                for i, s in enumerate(result.samples)
            ],
            usage=_usage(prompt_tokens, result.samples),
        )
        return JSONResponse(completion.model_dump(), headers=headers)

    # ---- control plane (DeploymentHandle) -------------------------------------------------------
    async def reload(self, version: int, weights: Mapping | str | Path, publish: bool = True) -> int:
        """Switch this replica to ``weights`` as ``version`` without dropping requests, and publish it
        so every other replica follows within ``reload_poll_s``. An older or equal version is a no-op.
        ``weights``: a state dict (HF names) or a checkpoint / policy folder. Returns the version served."""
        if isinstance(weights, (str, Path)):
            from ppg.learner.checkpoint import validate_checkpoint

            weights = str(validate_checkpoint(Path(weights), require_trainer_state=False))
        self._check_fits(version, weights)
        async with self._lock.write():
            if version > self.version:
                start = time.perf_counter()
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self.engine.update_weights, weights)
                logger.info(
                    "replica %s: version %d -> %d in %.3f s",
                    self.replica,
                    self.version,
                    version,
                    time.perf_counter() - start,
                )
                self.version = version
        if publish:
            await self._registry_actor().publish.remote(version, weights)
        return self.version

    async def policy_version(self) -> int:
        await self._ensure_poller()
        return self.version

    def _check_fits(self, version: int, weights: Mapping | str) -> None:
        check_weights_fit(self._shapes, weights, f"version {version}")

    def model_id(self, version: int | None = None) -> str:
        return f"{self.settings.model_name}-v{self.version if version is None else version}"

    # ---- internals ------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )

    def _job(self, body: ChatCompletionRequest) -> tuple[Job, int]:
        s = self.settings
        wanted = body.model
        if wanted != s.model_name and not wanted.startswith(f"{s.model_name}-v"):
            raise APIError(
                404,
                f"model {wanted!r} is not served here; use {self.model_id()!r} (see /v1/models)",
                "model",
                "model_not_found",
                type="not_found_error",
            )
        if body.n > s.max_n:
            raise APIError(400, f"n={body.n} is over this server's limit of {s.max_n}", "n", "n_too_large")
        if body.seed is not None and body.seed + body.n - 1 > SEED_MAX:
            raise APIError(
                400, f"seed + n - 1 must be at most {SEED_MAX} (choice i samples with seed + i)", "seed"
            )
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
                self.tokenizer.apply_chat_template(
                    [m.model_dump() for m in body.messages],
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
        job = Job(prompt, body.n, max_tokens, body.temperature, body.top_p, body.stop, body.seed)
        try:  # the engine's own check of the whole combination, before it can touch a batch
            self.engine.sampling_params(job)
        except SamplingRefused as e:
            raise APIError(
                400, f"the engine refuses this request: {e}", e.field, "invalid_sampling"
            ) from None
        return job, len(prompt)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _generate_batch(self, jobs: list[Job]) -> list[JobResult]:
        """One engine call for the fused requests. Requests are checked by the engine's own rules
        before they get here (``_job``), so an exception is unexpected: the batch's requests get a
        500, and a probe (a one-token generation) decides whether the engine itself is broken. An
        exception inside vLLM's step can leave its scheduler holding requests the model runner never
        took (later calls then hang): if the probe fails or does not answer in time, the replica stops
        taking work (503 at once) and ``check_health`` fails so that Serve replaces it."""
        async with self._lock.read():
            version = self.version
            loop = asyncio.get_running_loop()
            try:
                samples = await loop.run_in_executor(self._executor, self._generate_sync, jobs)
            except Exception as e:
                logger.exception("replica %s: a batch of %d request(s) failed", self.replica, len(jobs))
                if not await self._engine_answers():
                    self._engine_failure = f"{type(e).__name__}: {e}"
                    logger.error("replica %s: the engine failed its probe; no more requests", self.replica)
                    raise self._engine_failed() from e
                raise APIError(
                    500,
                    f"generation failed for this request ({type(e).__name__}); retry",
                    type="server_error",
                ) from e
        return [JobResult(version, s) for s in samples]

    async def _engine_answers(self, timeout_s: float = 30.0) -> bool:
        """A tiny real generation: the engine is healthy if it answers one token in time."""
        probe = Job(self._probe_prompt, 1, 1, 0.0, 1.0, None, None)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._generate_sync, [probe]), timeout_s
            )
            return True
        except Exception:
            return False

    def _generate_sync(self, jobs: list[Job]) -> list[list[Sample]]:
        return self.engine.complete(jobs)

    async def _sse(self, result: JobResult, model: str, fingerprint: str) -> AsyncIterator[str]:
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": fingerprint,
        }

        def event(choice: ChunkChoice) -> str:
            return f"data: {ChatCompletionChunk(**base, choices=[choice]).model_dump_json()}\n\n"

        for i, sample in enumerate(result.samples):
            yield event(ChunkChoice(index=i, delta=Delta(role="assistant", content="")))
            for piece in self._pieces(sample):
                yield event(ChunkChoice(index=i, delta=Delta(content=piece)))
            yield event(ChunkChoice(index=i, delta=Delta(), finish_reason=sample.finish_reason))
        yield "data: [DONE]\n\n"

    def _pieces(self, sample: Sample) -> list[str]:
        """The reply split at token boundaries (one piece per token that adds text)."""
        pieces, previous = [], ""
        for k in range(1, len(sample.token_ids) + 1):
            text = self.tokenizer.decode(sample.token_ids[:k], skip_special_tokens=True)[: len(sample.text)]
            if text.startswith(previous) and len(text) > len(previous):
                pieces.append(text[len(previous) :])
                previous = text
        return pieces if "".join(pieces) == sample.text else [sample.text]

    def _registry_actor(self):
        if self._registry is None:
            from ppg.policy_registry import get_registry

            self._registry = get_registry(self.app_name)
        return self._registry

    async def _ensure_poller(self) -> None:
        """Join the app's version registry once: catch up with its newest version before serving
        (a replica started after reloads), then poll it. If the registry cannot be reached the
        replica keeps serving its version and tries again on the next request or health check."""
        if self._poller is not None:
            return
        async with self._join_lock:
            if self._poller is not None:
                return
            try:
                registry = self._registry_actor()
                latest = await registry.claim.remote(self.deploy_id, self.version, str(self.policy_dir))
                if latest > self.version:
                    await self._catch_up()
            except Exception:
                logger.exception("replica %s: cannot reach the version registry", self.replica)
                return
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _catch_up(self) -> None:
        newer = await self._registry_actor().newer_than.remote(self.version)
        if newer is None:
            return
        version, payload = newer
        weights = payload if isinstance(payload, str) else await payload[0]
        await self.reload(version, weights, publish=False)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            try:
                await self._catch_up()
            except Exception:  # a failed poll must not kill the replica; the next one retries
                logger.exception("replica %s: polling the version registry failed", self.replica)

    def _check_engine(self) -> None:
        if self._engine_failure is not None:
            raise self._engine_failed()

    @staticmethod
    def _engine_failed() -> APIError:
        return APIError(
            503,
            "this replica's engine failed and is being replaced; retry shortly",
            type="server_error",
            code="engine_failed",
        )

    async def check_health(self) -> None:
        """Serve calls this periodically: it also starts the poller on a replica no request reached,
        and reports a failed engine so that Serve replaces the replica."""
        if self._engine_failure is not None:
            raise RuntimeError(f"replica {self.replica}: engine failed ({self._engine_failure})")
        await self._ensure_poller()


def deployment(settings: ServeSettings, deploy_id: str | None = None):
    """The bound application for ``settings`` (``serve.run(deployment(s))``)."""
    from ppg.rollout.engine import engine_actor_env

    env = engine_actor_env(settings.kv_cache_gib)
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    options: dict = {
        "name": "PolicyServer",
        "max_ongoing_requests": settings.max_ongoing_requests,
        "ray_actor_options": {
            "num_cpus": settings.num_cpus_per_replica,
            "num_gpus": settings.num_gpus_per_replica,
            "runtime_env": {"env_vars": env},
        },
        # a reload or a batch of long replies can take a while on CPU
        "graceful_shutdown_timeout_s": 30,
        # check_health fails once the engine failed: find out within seconds (Serve's default is 10 s)
        "health_check_period_s": 5,
    }
    if settings.autoscaling is not None:
        options["autoscaling_config"] = settings.autoscaling.model_dump()
    else:
        options["num_replicas"] = settings.num_replicas
    return PolicyServer.options(**options).bind(
        settings.model_dump(mode="json"), deploy_id or uuid.uuid4().hex
    )


def build_app(args: dict) -> serve.Application:
    """Serve config-file builder (``import_path: ppg.serve.app:build_app``); ``args`` are
    ``ServeSettings`` fields, at least ``checkpoint``. Host and port come from the file's
    ``http_options``, not from ``args``."""
    return deployment(ServeSettings.model_validate(args))
