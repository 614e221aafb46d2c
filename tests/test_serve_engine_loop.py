"""``ppg.serve.engine_loop.EngineLoop`` against a scripted engine (no vLLM, no Ray): tokens reach
their request as each step produces them, requests join a running batch between steps, a failed
step fails only the requests in it, aborts and calls run on the engine thread between steps."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ppg.rollout.engine import CompletionDelta, CompletionRequest, StepOutput
from ppg.serve.engine_loop import Aborted, EngineError, EngineLoop


class ScriptedEngine:
    """One token per running request per step (its text is the step number); finishes a request
    after its max_tokens. Every call must come from one thread, as vLLM requires."""

    def __init__(self) -> None:
        self.running: dict[str, list] = {}  # id -> [job, tokens so far]
        self.steps = 0
        self.fail_steps: set[int] = set()
        self.threads: set[str] = set()
        self.aborted: list[str] = []
        self.tickets: threading.Semaphore | None = None  # when set, each step takes one: the test paces it

    def _on_thread(self) -> None:
        self.threads.add(threading.current_thread().name)

    def submit(self, request_id: str, job: CompletionRequest) -> None:
        self._on_thread()
        self.running[request_id] = [job, 0]

    def busy(self) -> bool:
        return bool(self.running)

    def abort(self, ids: list[str]) -> None:
        self._on_thread()
        self.aborted += ids
        for i in ids:
            self.running.pop(i, None)

    def step(self) -> list[StepOutput]:
        self._on_thread()
        if self.tickets is not None:
            assert self.tickets.acquire(timeout=10), "the test gave no ticket for this step"
        self.steps += 1
        if self.steps in self.fail_steps:
            raise RuntimeError(f"step {self.steps} broke")
        outputs = []
        for rid, state in list(self.running.items()):
            job, _ = state
            state[1] += 1
            done = state[1] >= job.max_tokens
            delta = CompletionDelta(0, f"{self.steps} ", [self.steps], None, "length" if done else None)
            outputs.append(StepOutput(rid, [delta], done))
            if done:
                del self.running[rid]
        return outputs


def job(tokens: int, n: int = 1) -> CompletionRequest:
    return CompletionRequest([1, 2], n, tokens, 1.0, 1.0, None, None)


async def collect(stream) -> list[str]:
    return [d.text for deltas in [x async for x in stream.deltas()] for d in deltas]


def test_tokens_arrive_step_by_step_and_new_requests_join_the_running_batch():
    engine = ScriptedEngine()

    async def scenario():
        loop = EngineLoop(engine, max_sequences=8)
        engine.tickets = threading.Semaphore(1)  # one step, then the engine waits for the test
        first = loop.submit(job(4))
        first_tokens = []
        async for deltas in first.deltas():  # the first token arrives while the request still runs
            first_tokens += [d.text for d in deltas]
            if len(first_tokens) == 1:
                assert not first.done.done()
                second = loop.submit(job(2))  # joins between steps, not after the first finished
                await asyncio.sleep(0.05)  # it reached the engine thread's inbox
                engine.tickets.release(10)
        second_tokens = await collect(second)
        loop.stop()
        return first_tokens, second_tokens

    first, second = asyncio.run(scenario())
    assert first == ["1 ", "2 ", "3 ", "4 "]
    assert len(second) == 2 and int(second[0]) < 4, second  # generated alongside the first request
    assert engine.threads == {"ppg-engine"}


def test_a_failed_step_fails_its_requests_only_and_the_engine_goes_on():
    engine = ScriptedEngine()
    engine.fail_steps = {2}
    errors = []

    async def scenario():
        loop = EngineLoop(engine, max_sequences=8, on_step_error=errors.append)
        a, b = loop.submit(job(5)), loop.submit(job(5))
        for stream in (a, b):
            with pytest.raises(EngineError, match="step 2 broke"):
                await collect(stream)
        after = await collect(loop.submit(job(2)))
        loop.stop()
        return a, b, after

    a, b, after = asyncio.run(scenario())
    assert sorted(engine.aborted) == sorted([a.request_id, b.request_id])  # nothing stale in the engine
    assert len(errors) == 1 and len(after) == 2


def test_max_sequences_admits_in_arrival_order_and_abort_frees_a_slot():
    engine = ScriptedEngine()

    async def scenario():
        loop = EngineLoop(engine, max_sequences=2)
        engine.tickets = threading.Semaphore(0)
        big = loop.submit(job(50, n=2))  # fills both slots
        waiting = loop.submit(job(1))
        await asyncio.sleep(0.05)
        assert waiting.request_id not in engine.running
        loop.abort(big)
        engine.tickets.release(10)
        with pytest.raises(Aborted):
            await collect(big)
        assert await collect(waiting) != []
        assert await loop.call(lambda: threading.current_thread().name) == "ppg-engine"
        loop.stop()
        return big

    big = asyncio.run(scenario())
    assert big.request_id in engine.aborted
