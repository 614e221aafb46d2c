"""``ppg serve``: the policy behind an OpenAI-compatible HTTP API, on Ray Serve.

One deployment (``PolicyServer``), one vLLM engine per replica, FastAPI ingress:

* ``POST /v1/chat/completions`` - chat through the model's chat template; a persona is the system
  (or developer) message. ``stream: true`` answers with SSE ``data: {chunk}`` lines as the engine
  produces tokens, then ``data: [DONE]``. Supported fields: ``schemas.ChatCompletionRequest``; any
  other field is a 400 naming it.
* ``GET /v1/models``, ``GET /v1/models/{id}`` - one model, ``<model_name>-v<version>``.
* ``GET /healthz`` - version, replica, in-flight requests (no auth: for probes).
* ``GET /`` and ``GET /live`` - a chat page for the live agent and a training page (``ppg/serve/ui.py``).

Every response names the policy version that produced it: ``system_fingerprint = "ppg-v<version>"``
and the ``x-ppg-policy-version`` header. Client mistakes are 4xx in OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``) naming the field; never 500.

The engine runs on its own thread, step by step (``engine_loop.EngineLoop``): a request joins the
running batch at the next step and its tokens reach the client as they are generated. A request
holds the read side of a readers-writer lock from admission until the engine is done with it; a
reload takes the write side: it waits for those requests and holds new ones back until the weights
are switched, so no request is dropped and each is answered entirely by one version. How a reload
reaches every replica: ``ppg/policy_registry.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ppg.rollout.engine import CompletionDelta, CompletionRequest
from ppg.serve.engine_loop import EngineError, EngineLoop, ReadWriteLock, RequestStream
from ppg.serve.errors import APIError, documented, install_error_handlers
from ppg.serve.requests import build_job, model_not_found, serves
from ppg.serve.responses import Reply, error_event
from ppg.serve.schemas import ChatCompletion, ChatCompletionRequest, Health, ModelCard, ModelList
from ppg.serve.settings import ServeSettings
from ppg.serve.ui import install_ui
from ppg.weights import WeightsMismatch, check_weights_fit, tensor_shapes

logger = logging.getLogger("ppg.serve")
VERSION_HEADER = "x-ppg-policy-version"
__all__ = ["Job", "PolicyServer", "ReadWriteLock", "build_app", "deployment"]

Job = CompletionRequest  # a request's sampling job is the engine's own type: the engine samples


app = FastAPI(title="ppg policy (OpenAI-compatible)")
install_error_handlers(app)
install_ui(app)  # the chat page (/) and the training page (/live): ppg/serve/ui.py


@app.middleware("http")
async def _version_header(request: Request, call_next):
    """Every response (errors included) names the version the replica serves."""
    response = await call_next(request)
    server = getattr(request.app.state, "server", None)  # the replica's own copy of app
    if server is not None and VERSION_HEADER not in response.headers:
        response.headers[VERSION_HEADER] = str(server.version)
    return response


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
        self._probe_prompt = list(  # the health probe's prompt (see _engine_answers)
            self.engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}],
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
            )
        )
        self._shapes = tensor_shapes(self.policy_dir)  # what a reload must match
        self._api_key = s.api_key()
        self._lock = ReadWriteLock()
        self._loop: EngineLoop | None = None  # started on the replica's event loop: see _engine_loop
        self._holders: set[asyncio.Task] = set()  # one per admitted request: its read side of _lock
        self._probe: asyncio.Task | None = None  # the running engine probe, shared by all who wait on it
        self._in_flight = 0
        self._engine_failure: str | None = None  # set when the engine failed its probe: see _failed
        self._created = int(time.time())
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
        data = ModelList(data=[self._card()]).model_dump()
        return JSONResponse(data, headers={VERSION_HEADER: str(self.version)})

    @app.get(
        "/v1/models/{model_id}",
        response_model=None,
        responses={200: {"model": ModelCard}, **documented(401, 404)},
    )
    async def model(self, model_id: str, request: Request) -> JSONResponse:
        """The served model under any id a chat request may name (see ``requests.serves``)."""
        self._authorize(request)
        await self._ensure_poller()
        if not serves(self.settings, model_id):
            raise model_not_found(model_id, self.model_id())
        return JSONResponse(self._card().model_dump(), headers={VERSION_HEADER: str(self.version)})

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
        job, prompt_tokens = build_job(body, self.settings, self.engine, self.model_id())
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.stream:
            stream, version = await self._admit(job)
            reply = Reply(job.n, prompt_tokens, self.model_id(version), f"ppg-v{version}", top)
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                self._sse(stream, reply, usage),
                media_type="text/event-stream",
                headers={VERSION_HEADER: str(version)},
            )
        version, steps = await self._generate(job)
        reply = Reply(job.n, prompt_tokens, self.model_id(version), f"ppg-v{version}", top)
        for deltas in steps:
            reply.add(deltas)
        return JSONResponse(reply.completion().model_dump(), headers={VERSION_HEADER: str(version)})

    # ---- control plane (DeploymentHandle) -------------------------------------------------------
    async def reload(self, version: int, weights: Mapping | str | Path, publish: bool = True) -> int:
        """Switch this replica to ``weights`` as ``version`` without dropping requests, and publish it
        so every other replica follows within ``reload_poll_s``. An older or equal version is a no-op.
        ``weights``: a state dict (HF names) or a checkpoint / policy folder. Returns the version served.
        A reload that fails inside vLLM can leave the engine unable to generate (measured): a probe
        then decides, and a failed probe takes the replica out of service (Serve replaces it)."""
        if isinstance(weights, (str, Path)):
            from ppg.learner.checkpoint import validate_checkpoint

            weights = str(validate_checkpoint(Path(weights), require_trainer_state=False))
        self._check_fits(version, weights)
        self._check_engine()
        async with self._lock.write():
            if version > self.version:
                start = time.perf_counter()
                try:
                    await self._engine_loop().call(self.engine.update_weights, weights)
                except WeightsMismatch:
                    raise
                except Exception as e:
                    logger.exception("replica %s: reloading version %d failed", self.replica, version)
                    await self._failed(e)
                    raise
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

    async def _generate(self, job: Job) -> tuple[int, list[list[CompletionDelta]]]:
        """Run ``job`` to the end: (the version that answered, its deltas step by step). Reachable
        through a handle too, past the HTTP checks: how tests make the engine fail."""
        stream, version = await self._admit(job)
        steps = []
        try:
            async for deltas in stream.deltas():
                steps.append(deltas)
        except EngineError as e:
            raise await self._failed(e) from e
        finally:  # cancelled (the client went away): stop generating; a no-op once finished
            self._engine_loop().abort(stream)
        return version, steps

    def _check_fits(self, version: int, weights: Mapping | str) -> None:
        check_weights_fit(self._shapes, weights, f"version {version}")

    def model_id(self, version: int | None = None) -> str:
        return f"{self.settings.model_name}-v{self.version if version is None else version}"

    # ---- internals ------------------------------------------------------------------------------
    def _card(self) -> ModelCard:
        return ModelCard(
            id=self.model_id(),
            created=self._created,
            root=str(self.settings.checkpoint),
            policy_version=self.version,
        )

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

    def _engine_loop(self) -> EngineLoop:
        """The engine's thread, started on first use: it hands tokens to this event loop."""
        if self._loop is None:
            s = self.settings
            self._loop = EngineLoop(self.engine, s.max_batch_size, s.batch_wait_timeout_s, self._step_failed)
        return self._loop

    async def _admit(self, job: Job) -> tuple[RequestStream, int]:
        """Take the read side of the lock (waits while a reload runs), note the version, hand the job
        to the engine. The read side is released when the engine is done with the job, not when its
        client has read the reply, so a slow reader never holds a reload back."""
        loop = self._engine_loop()
        await self._lock.acquire_read()  # no await between here and the holder task: cannot leak
        version = self.version
        self._in_flight += 1
        stream = loop.submit(job)
        holder = asyncio.ensure_future(self._release_when_done(stream))
        self._holders.add(holder)
        holder.add_done_callback(self._holders.discard)
        return stream, version

    async def _release_when_done(self, stream: RequestStream) -> None:
        try:
            await stream.done
        finally:
            self._in_flight -= 1
            await self._lock.release_read()

    async def _sse(self, stream: RequestStream, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        try:
            for event in reply.opening():
                yield event
            async for deltas in stream.deltas():
                for event in reply.chunks(deltas):
                    yield event
            if include_usage:
                yield reply.usage_chunk()
            yield "data: [DONE]\n\n"
        except EngineError as e:  # the reply has begun (200): the error goes into the stream
            yield error_event(await self._failed(e))
        finally:  # the client went away: stop generating; a no-op once finished
            self._engine_loop().abort(stream)

    def _step_failed(self, error: BaseException) -> None:
        """An engine step raised: probe at once (every request of that step waits on the answer)."""
        self._start_probe()

    def _start_probe(self) -> asyncio.Task:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._engine_answers())
        return self._probe

    async def _failed(self, error: BaseException) -> APIError:
        """What to answer after the engine raised on a request. Requests are checked by the engine's
        own rules before they get here (``build_job``), so an exception is unexpected: a probe (a
        one-token generation) decides whether the engine itself is broken. If it fails or does not
        answer in time, the replica stops taking work (503 at once) and ``check_health`` fails so
        that Serve replaces it; otherwise only this request failed (500, retry)."""
        if self._engine_failure is None and not await asyncio.shield(self._start_probe()):
            self._engine_failure = f"{type(error).__name__}: {error}"
            logger.error("replica %s: the engine failed its probe; no more requests", self.replica)
        if self._engine_failure is not None:
            return self._engine_failed()
        return APIError(500, f"generation failed for this request ({error}); retry", type="server_error")

    async def _engine_answers(self, timeout_s: float = 30.0) -> bool:
        """A tiny real generation: the engine is healthy if it answers one token in time."""
        stream = self._engine_loop().submit(Job(self._probe_prompt, 1, 1, 0.0, 1.0, None, None))
        try:
            async with asyncio.timeout(timeout_s):
                async for _ in stream.deltas():
                    pass
            return True
        except Exception:
            return False
        finally:
            self._engine_loop().abort(stream)

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
        if self._engine_failure is None and self._loop is not None and not self._loop.alive:
            self._engine_failure = f"the engine thread died ({self._loop.crashed!r})"
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
        try:
            self._check_engine()
        except APIError:
            raise RuntimeError(f"replica {self.replica}: engine failed ({self._engine_failure})") from None
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
