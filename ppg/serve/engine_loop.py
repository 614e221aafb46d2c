"""The replica's engine, driven step by step on one thread, with an asyncio face.

Why not vLLM's ``AsyncLLM``: in vLLM 0.32 it always runs the engine core in another process (and,
on CPU, the model in a third), re-imports ``__main__`` there, and took 3 minutes to start on this
2-core machine (the in-process engine: ~8 s); a state dict can only reach that process serialised
(``reload_weights(weights_iterator=...)`` failed across it), and a replica would own processes Ray
does not know about. So the replica keeps the in-process ``vllm.LLM`` (``VLLMEngine``) and this
module does what ``AsyncLLM`` does on top of it: one thread runs ``step()`` while any request is
unfinished; new requests join the running batch between steps (continuous batching); each step's
tokens go to their request's asyncio queue at once, so a streamed reply leaves the server token by
token. vLLM is not thread-safe: every engine call (submit, step, abort, a weight reload) happens on
this thread, in the order the event loop asked for it.

If a step raises, every request in that step fails (they were computed together) and is aborted in
the engine, so its scheduler holds nothing stale; the owner decides with a probe whether the engine
still works (``PolicyServer``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from ppg.rollout.engine import CompletionDelta, CompletionRequest, VLLMEngine

logger = logging.getLogger("ppg.serve")


class ReadWriteLock:
    """Many readers (requests being generated) or one writer (a reload); a waiting writer blocks new
    readers, so a reload is never starved by a steady stream of requests. ``acquire_read`` /
    ``release_read`` for a read side held across tasks (a streamed reply)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    async def acquire_read(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1

    async def release_read(self) -> None:
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    @asynccontextmanager
    async def read(self):
        await self.acquire_read()
        try:
            yield
        finally:
            await self.release_read()

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


class EngineError(RuntimeError):
    """The engine failed while it worked on this request (not the request's fault)."""


class Aborted(Exception):
    """The request was aborted (its client went away) before it finished."""


@dataclass(eq=False)  # identity: a stream is found in the waiting queue by itself
class RequestStream:
    """One request's deltas as the engine produces them. ``done`` resolves when the engine is
    finished with it (completed, failed or aborted): the moment its read side of the lock can go."""

    request_id: str
    job: CompletionRequest
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    async def deltas(self):
        """Yield lists of deltas until the request finishes; raise what ended it otherwise."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                return
            yield item

    def _push(self, deltas: list[CompletionDelta], finished: bool) -> None:
        if deltas:
            self.queue.put_nowait(deltas)
        if finished:
            self._end(None)

    def _end(self, outcome: BaseException | None) -> None:
        if not self.done.done():
            self.queue.put_nowait(outcome)
            self.done.set_result(None)


@dataclass
class _Call:
    fn: Callable[..., Any]
    args: tuple
    future: asyncio.Future


class EngineLoop:
    """Runs ``engine`` on its own thread; at most ``max_sequences`` sequences (a request of n choices
    counts n) run at once, the rest wait in arrival order. When the engine is idle, the first step
    waits ``gather_s`` so that requests arriving together are prefilled together."""

    def __init__(
        self,
        engine: VLLMEngine,
        max_sequences: int,
        gather_s: float = 0.0,
        on_step_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_sequences = max_sequences
        self.gather_s = gather_s
        self.on_step_error = on_step_error  # called on the event loop, once per failed step
        self.crashed: BaseException | None = None  # the thread itself died (a bug): see alive
        self._aloop = asyncio.get_running_loop()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[RequestStream] = deque()
        self._running: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="ppg-engine", daemon=True)
        self._thread.start()

    # ---- event-loop side -------------------------------------------------------------------------
    def submit(self, job: CompletionRequest) -> RequestStream:
        stream = RequestStream(f"ppg-{next(self._ids)}", job)
        if not self.alive:
            stream._end(EngineError(f"the engine thread died ({self.crashed!r})"))
        else:
            self._inbox.put(stream)
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Stop generating ``stream`` (its client went away); harmless once it finished."""
        if not stream.done.done():
            self._inbox.put(("abort", stream))

    async def call(self, fn: Callable[..., Any], *args) -> Any:
        """Run ``fn(*args)`` on the engine thread between two steps (a weight reload)."""
        if not self.alive:
            raise EngineError(f"the engine thread died ({self.crashed!r})")
        future = self._aloop.create_future()
        self._inbox.put(_Call(fn, args, future))
        return await future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._inbox.put("stop")

    # ---- engine thread ---------------------------------------------------------------------------
    def _send(self, fn: Callable, *args) -> None:
        self._aloop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        try:
            while True:
                if not self._running and not self._waiting:
                    if not self._handle(self._inbox.get()):  # idle: block until there is work
                        return
                    if self.gather_s and self._waiting:
                        time.sleep(self.gather_s)
                while True:
                    try:
                        command = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not self._handle(command):
                        return
                self._admit()
                if self._running:
                    self._step()
        except BaseException as e:  # a bug in this loop: fail everything, check_health reports it
            logger.exception("the engine thread died")
            self.crashed = e
            for stream in [*self._running.values(), *self._waiting]:
                self._send(stream._end, EngineError(f"the engine thread died ({e!r})"))
            raise

    def _handle(self, command) -> bool:
        if command == "stop":
            return False
        if isinstance(command, RequestStream):
            self._waiting.append(command)
        elif isinstance(command, _Call):
            try:
                result = command.fn(*command.args)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
                self._send(_settle, command.future, None, e)
            else:
                self._send(_settle, command.future, result, None)
        else:  # ("abort", stream)
            stream = command[1]
            if stream in self._waiting:
                self._waiting.remove(stream)
            elif self._running.pop(stream.request_id, None) is not None:
                self.engine.abort([stream.request_id])
            self._send(stream._end, Aborted(stream.request_id))
        return True

    def _admit(self) -> None:
        busy = sum(s.job.n for s in self._running.values())
        while self._waiting and (not self._running or busy + self._waiting[0].job.n <= self.max_sequences):
            stream = self._waiting.popleft()
            try:
                self.engine.submit(stream.request_id, stream.job)
            except Exception as e:  # refused by vLLM's own checks: this request's failure only
                logger.exception("the engine refused request %s", stream.request_id)
                self._send(stream._end, EngineError(f"the engine refused the request ({type(e).__name__})"))
                continue
            self._running[stream.request_id] = stream
            busy += stream.job.n

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            failed = list(self._running.values())
            logger.exception("an engine step failed; %d request(s) in it fail", len(failed))
            self._running.clear()
            try:
                self.engine.abort([s.request_id for s in failed])
            except Exception:
                logger.exception("aborting the failed step's requests failed too")
            error = EngineError(f"generation failed ({type(e).__name__}: {e})")
            for stream in failed:
                self._send(stream._end, error)
            if self.on_step_error is not None:
                self._send(self.on_step_error, e)
            return
        delivered = []
        for out in outputs:
            stream = self._running.get(out.request_id)
            if stream is None:  # aborted meanwhile
                continue
            if out.finished:
                del self._running[out.request_id]
            delivered.append((stream, out.deltas, out.finished))
        if delivered:  # one wake-up of the event loop per step, not one per request
            self._send(_deliver, delivered)


def _deliver(outputs: list[tuple[RequestStream, list[CompletionDelta], bool]]) -> None:
    for stream, deltas, finished in outputs:
        stream._push(deltas, finished)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
