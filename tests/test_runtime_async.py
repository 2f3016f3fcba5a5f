"""AsyncLLMEngine: concurrent streams, abort on cancel/disconnect, health, shutdown."""

from __future__ import annotations

import asyncio

import pytest
from runtime_helpers import (
    CharTokenizer,
    greedy,
    make_engine,
    random_prompts,
    tiny_models,
)

from trt_gemma.errors import RequestError
from trt_gemma.runtime import AsyncLLMEngine, EngineDeadError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("tiny"), "gemma3-gqa")[1]


@pytest.fixture
def engine(model):
    engine = AsyncLLMEngine(make_engine(model, CharTokenizer()))
    yield engine
    engine.shutdown()
    assert not engine._thread.is_alive()
    assert engine.engine.block_manager.all_free()


async def _collect(engine, prompt, params, rid):
    return [out async for out in engine.generate(prompt, params, rid)]


def test_concurrent_streams_match_offline(model, engine):
    prompts = random_prompts([5, 12, 3], seed=1)
    params = [greedy(8), greedy(15), greedy(4)]

    async def main():
        return await asyncio.gather(*[_collect(engine, p, sp, f"r{i}")
                                      for i, (p, sp) in enumerate(zip(prompts, params,
                                                                      strict=True))])

    streams = asyncio.run(main())
    offline = make_engine(model, CharTokenizer())
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        offline.add_request(str(i), p, sp)
    finals = {}
    while offline.has_unfinished_requests():
        finals.update({o.request_id: o for o in offline.step() if o.finished})
    for i, stream in enumerate(streams):
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert stream[-1].outputs[0].token_ids == finals[str(i)].outputs[0].token_ids
        lengths = [len(o.outputs[0].token_ids) for o in stream]
        assert lengths == sorted(lengths)  # one output per step, growing
    assert engine.is_alive()
    assert engine.get_stats().num_finished_requests == 3


def test_cancel_aborts_and_frees_blocks_within_a_step(engine):
    async def main():
        prompt = random_prompts([40], seed=2)[0]
        agen = engine.generate(prompt, greedy(200), "long")
        first = await agen.__anext__()
        assert not first.finished
        await agen.aclose()  # the client went away
        for _ in range(200):  # the engine thread drains the abort before its next step
            if engine.engine.block_manager.all_free() and not engine.engine.requests:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_task_cancellation_aborts(engine):
    async def main():
        task = asyncio.create_task(_collect(engine, [5, 6, 7], greedy(200), "c"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not engine.engine.has_unfinished_requests():
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_errors_reach_the_caller(engine):
    async def main():
        with pytest.raises(RequestError):
            await _collect(engine, [], greedy(4), "empty")
        gen = engine.generate([5, 6], greedy(50), "dup")
        await gen.__anext__()
        with pytest.raises(RequestError, match="already"):
            await _collect(engine, [5, 6], greedy(4), "dup")
        await gen.aclose()

    asyncio.run(main())
    assert engine.is_alive()


def test_shutdown_ends_open_streams(model):
    engine = AsyncLLMEngine(make_engine(model))

    async def main():
        gen = engine.generate([5, 6, 7], greedy(250), "s")
        await gen.__anext__()
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in gen:
                pass
        with pytest.raises(EngineDeadError):
            await _collect(engine, [5], greedy(2), "late")

    asyncio.run(main())
    assert not engine.is_alive()
