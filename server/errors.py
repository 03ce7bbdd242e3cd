"""OpenAI-shaped errors: the one exception type handlers raise, and the middleware that
turns every failure (ours, aiohttp's, or a bug) into {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

logger = logging.getLogger(__name__)

# HTTP status -> the OpenAI error `type` a client library keys on.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}

# "max_tokens must be ...", "messages[0].role is required", "prompt has 9000 tokens ..."
_LEADING_FIELD = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*)")


class APIError(Exception):
    """An error a handler answers with; `param` names the request field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict:
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def bad_request(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def param_from_message(message: str, known_fields: frozenset[str] | set[str]) -> str | None:
    """The field a ValueError's message starts with, if it is one of the request's fields.

    The engine and SamplingParams name the field first ("top_p must be in (0, 1]"), so the
    message alone is enough to fill `param` without each layer knowing about HTTP.
    """
    m = _LEADING_FIELD.match(message)
    if m is None:
        return None
    path = m.group(1)
    root = re.split(r"[\[.]", path, maxsplit=1)[0]
    if root == "prompt_token_ids":
        # the engine's name for what the client sent as `prompt`
        return "prompt"
    return path if root in known_fields else None


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Nothing a client sends may escape as aiohttp's plain-text 500: APIErrors render as
    themselves, aiohttp's HTTP errors (404 route, 405, 413 body size) get the OpenAI shape, and
    anything else is a bug: logged with its traceback, answered with an OpenAI-shaped 500."""
    try:
        return await handler(request)
    except APIError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # aiohttp's text is "404: Not Found" for plain errors, a real sentence for 413
        message = e.reason if not e.text or e.text.startswith(f"{e.status}:") else e.text
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status)
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.json_response(
            error_body(e.status, message, code=code), status=e.status, headers=headers
        )
    except ConnectionResetError:
        raise  # the client is gone: there is no one to answer
    except Exception:
        logger.exception("unhandled error serving %s %s", request.method, request.path)
        return web.json_response(
            error_body(500, "internal server error (logged on the server)", code="internal_error"),
            status=500,
        )
