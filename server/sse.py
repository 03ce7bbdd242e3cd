"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` frames, then `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # nginx buffers responses by default, which would hold tokens back until the end
    "X-Accel-Buffering": "no",
}
DONE_FRAME = b"data: [DONE]\n\n"


def encode_event(data: dict[str, Any]) -> bytes:
    # compact, one line: json.dumps escapes newlines inside strings, so a frame never splits
    return (
        b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
    )


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    return response


async def send_event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    """Raises ConnectionResetError once the client is gone; the handler's finally aborts."""
    await response.write(encode_event(data))


async def send_done(response: web.StreamResponse) -> None:
    await response.write(DONE_FRAME)
    await response.write_eof()
