"""Server-sent events: ``data: {json}`` per chunk, ``data: [DONE]`` at the end, cleanup guaranteed.

Starlette cancels a streaming response when the client disconnects. If that happens before the
body generator was first iterated, the generator never runs and its ``finally`` never would
either; ``EventStream`` therefore closes the generator and releases the request's admission
itself, whatever way the response ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from trt_gemma.server.errors import error_body, from_exception

logger = logging.getLogger("trt_gemma.server")

DONE = "data: [DONE]\n\n"


def event(chunk: BaseModel | dict) -> str:
    data = chunk.model_dump_json() if isinstance(chunk, BaseModel) else json.dumps(chunk)
    return f"data: {data}\n\n"


async def with_done(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """The chunks as events, then [DONE]; an error after the 200 went out becomes an error event
    (the status can no longer change), still followed by [DONE] so clients end cleanly."""
    try:
        async for chunk in chunks:
            yield event(chunk)
    except Exception as e:  # CancelledError (client gone) is not an Exception: it propagates
        api = from_exception(e)
        yield event(error_body(api.status, api.message, api.param, api.code))
    finally:
        await chunks.aclose()
    yield DONE


class EventStream(StreamingResponse):
    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            # Runs the generator's own finally (engine aborts) if it is suspended mid-stream; a
            # no-op if it finished. Nothing in those finally blocks awaits, so a cancelled task
            # still completes them.
            await self.body_iterator.aclose()
