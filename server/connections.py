"""Connection hygiene: deadlines for reading a request, a keep-alive timeout, a connection bound.

aiohttp alone closes a connection idle past its keep-alive timeout (an hour by default),
but once a client has sent one byte of a request nothing bounds how long it may take to
send the rest (slowloris), and nothing bounds how many connections are open. Here:

- GuardedRequestHandler, aiohttp's per-connection protocol plus three phases:
  IDLE (between requests) -> HEAD (a byte of a request arrived) -> BUSY (the app has it).
  IDLE is closed after `keep_alive_timeout_s`; HEAD must end within `header_timeout_s`; a
  body must have fully arrived `body_timeout_s` after the head. These are total deadlines,
  so a trickle of bytes does not extend them. A timed-out request gets a 408 and its
  connection is closed.
- ConnectionGuard: at `max_connections` a new connection closes the longest-idle keep-alive
  connection to make room (as nginx does), or, when none is idle, gets a 503 and is closed.
- connection_middleware tells a connection when the app got its request; the connection
  itself sees the response written (finish_response).
- start_http: the runner and the listening site that use them (`jaxserve serve`).

Malformed HTTP is logged as one WARNING line, at most one per 10 s (ProtocolLog), and no
response names the server's software versions.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from server.errors import error_body

logger = logging.getLogger("jaxserve.http")

# The Server header: what the software is, never which versions of it (aiohttp's default,
# "Python/3.11 aiohttp/3.14.5", tells an attacker which advisories apply)
SERVER_HEADER = "jaxserve"
# file descriptors the API process needs besides its connections (IPC, logs, libraries)
_FDS_BESIDES_CONNECTIONS = 64
# a malformed request's reason quotes the client's bytes: enough to recognise, no more
_MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0  # first byte of a request head -> its last byte
    body_timeout_s: float = 60.0  # end of the head -> last byte of the body
    keep_alive_timeout_s: float = 5.0  # idle between requests, and before the first one
    max_connections: int = 1024  # open connections; past it: evict the longest-idle, or 503

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")


class RateLimitedLog:
    """WARNING lines about misbehaving clients, at most one per `interval_s`; the next line
    says how many were left out, so a fuzzer or a port scan cannot flood the log."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._next_s = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next_s:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} more such lines left out)"
        self._next_s = now + self.interval_s
        self._suppressed = 0
        logger.warning(msg, *args)


class ProtocolLog(logging.LoggerAdapter):
    """The logger aiohttp's RequestHandler writes to. aiohttp logs every malformed request
    with `logger.exception` (ERROR + traceback); a client's bad bytes are not our error, so
    they become one rate-limited WARNING line. Anything else still logs as an ERROR."""

    def __init__(self, limiter: RateLimitedLog) -> None:
        super().__init__(logger, {})
        self._limiter = limiter

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if str(msg).startswith("Error handling request") and isinstance(exc, HttpProcessingError):
            remote = args[0] if args else "?"
            reason = " ".join(str(exc.message).split())[:_MAX_REASON_CHARS]  # one line
            self._limiter.warning("malformed HTTP request from %s: %s", remote, reason)
            return
        self.logger.error(msg, *args, exc_info=exc_info, **kwargs)


class _Phase(enum.Enum):
    IDLE = "idle"  # between requests (and before the first): the keep-alive timeout applies
    HEAD = "head"  # bytes of a request head arrived: the header deadline applies
    BUSY = "busy"  # the app holds a request: the body deadline applies until it arrived


class ConnectionGuard:
    """The open connections of one listener and their limits."""

    def __init__(self, limits: ConnectionLimits, log: RateLimitedLog | None = None) -> None:
        self.limits = limits
        self.log = log or RateLimitedLog()
        self.open: set[GuardedRequestHandler] = set()

    def admit(self, conn: GuardedRequestHandler) -> bool:
        """Registers `conn`; False when it must be refused (the bound is reached, none idle)."""
        if len(self.open) >= self.limits.max_connections:
            idle = [c for c in self.open if c.guard_phase is _Phase.IDLE]
            if not idle:
                self.log.warning(
                    "refusing a connection: %d open (--max-connections)", len(self.open)
                )
                return False
            victim = min(idle, key=lambda c: c.guard_idle_since)
            self.open.discard(victim)
            victim.force_close()
        self.open.add(conn)
        return True

    def release(self, conn: GuardedRequestHandler) -> None:
        self.open.discard(conn)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, with request deadlines and the connection bound.

    NOTE: only the asyncio Protocol methods and RequestHandler's public `handle_error` and
    `finish_response` are overridden; aiohttp's own parsing and keep-alive are untouched.
    """

    def __init__(self, guard: ConnectionGuard, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.guard_phase = _Phase.IDLE
        self.guard_idle_since = time.monotonic()  # when it last became idle
        self._guard_deadline: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.guard.admit(self):
            self._refuse(
                503,
                "Service Unavailable",
                "too many open connections; retry shortly",
                "too_many_connections",
                ("Retry-After: 1",),
            )
            return
        self._become_idle()

    def data_received(self, data: bytes) -> None:
        if self.guard_phase is _Phase.IDLE and data:
            self.guard_phase = _Phase.HEAD
            self._arm(self.guard.limits.header_timeout_s, self._head_timed_out)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self.guard.release(self)
        super().connection_lost(exc)

    # ---- aiohttp hooks ----------------------------------------------------------------

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own answers (a 400 for malformed HTTP) skip the app's signals
        resp = super().handle_error(request, status, exc, message)
        resp.headers[hdrs.SERVER] = SERVER_HEADER
        return resp

    async def finish_response(
        self, request: Any, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # the response is written here, after the app (and its middlewares) returned it: the
        # connection is idle (evictable) only once this is done
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._become_idle()

    # ---- driven by connection_middleware ------------------------------------------------

    def request_started(self, request: web.Request) -> None:
        self._disarm()
        self.guard_phase = _Phase.BUSY
        if not request.content.is_eof():
            self._arm(self.guard.limits.body_timeout_s, lambda: self._body_timed_out(request))

    # ---- deadlines ----------------------------------------------------------------------

    def _become_idle(self) -> None:
        self.guard_phase = _Phase.IDLE
        self.guard_idle_since = time.monotonic()
        if self.transport is not None:  # else it is closed (or closing after this response)
            self._arm(self.guard.limits.keep_alive_timeout_s, self._idle_timed_out)
        else:
            self._disarm()

    def _idle_timed_out(self) -> None:
        self._guard_deadline = None
        if self.guard_phase is _Phase.IDLE:
            self.force_close()  # silently, as a keep-alive timeout always is

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._guard_deadline = asyncio.get_running_loop().call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._guard_deadline is not None:
            self._guard_deadline.cancel()
            self._guard_deadline = None

    def _head_timed_out(self) -> None:
        self._guard_deadline = None
        limit = self.guard.limits.header_timeout_s
        self.guard.log.warning("closing a connection: request head not complete after %gs", limit)
        self._refuse(
            408,
            "Request Timeout",
            f"the request head did not arrive within {limit:g} s (--header-timeout)",
            "request_timeout",
        )

    def _body_timed_out(self, request: web.Request) -> None:
        self._guard_deadline = None
        if request.content.is_eof():  # it all arrived; the handler has it
            return
        limit = self.guard.limits.body_timeout_s
        self.guard.log.warning("closing a connection: request body not complete after %gs", limit)
        self._refuse(
            408,
            "Request Timeout",
            f"the request body did not arrive within {limit:g} s (--body-timeout)",
            "request_timeout",
        )

    def _refuse(
        self, status: int, reason: str, message: str, code: str, extra: tuple[str, ...] = ()
    ) -> None:
        # Written directly: the app has not started a response on this connection (a head is
        # incomplete, or the handler still waits for the body). Closing the transport then
        # cancels a waiting handler (handler_cancellation), which aborts its engine request.
        body = json.dumps(error_body(status, message, code=code)).encode()
        head = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
            f"Server: {SERVER_HEADER}",
            *extra,
        ]
        if self.transport is not None:
            self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.force_close()


@web.middleware
async def connection_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Outermost: tells the connection its request head is complete (the app has it)."""
    conn = request.protocol
    if isinstance(conn, GuardedRequestHandler):  # else another listener (tests' aiohttp_client)
        conn.request_started(request)
    return await handler(request)


async def set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response the app sends names no versions."""
    response.headers[hdrs.SERVER] = SERVER_HEADER


class GuardedSite(web.BaseSite):
    """A TCP listener whose connections are GuardedRequestHandlers of `guard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        handler_kwargs: dict[str, Any],
    ) -> None:
        super().__init__(runner)
        self.host = host
        self.port = port  # the bound port once started (useful with port 0)
        self.guard = guard
        self._handler_kwargs = handler_kwargs

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        manager = self._runner.server
        assert manager is not None

        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(self.guard, manager, loop=loop, **self._handler_kwargs)

        self._server = await loop.create_server(
            protocol, self.host, self.port, backlog=self._backlog, reuse_address=True
        )
        if self._server.sockets:
            self.port = self._server.sockets[0].getsockname()[1]


def ensure_fd_limit(max_connections: int) -> None:
    """Raises the soft open-files limit to fit `max_connections` (as vLLM does at start-up);
    a limit too low to raise is logged, since accept() would fail before the bound does."""
    need = max_connections + _FDS_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        target = soft
    if target < need:
        logger.warning(
            "open-files limit %d is below --max-connections %d + %d; lower --max-connections "
            "or raise the limit (ulimit -n)",
            target,
            max_connections,
            _FDS_BESIDES_CONNECTIONS,
        )


async def start_http(
    app: web.Application,
    host: str,
    port: int,
    limits: ConnectionLimits,
    *,
    shutdown_timeout_s: float,
) -> tuple[web.AppRunner, GuardedSite]:
    """Sets up `app` and listens on host:port; the caller cleans the runner up."""
    log = RateLimitedLog()
    handler_kwargs: dict[str, Any] = {
        # NOTE: the keep-alive timeout is ours (GuardedRequestHandler), not aiohttp's: aiohttp
        # also closes a connection whose request head is incomplete when its keep-alive timer
        # fires, so a head begun 4.9 s into a 5 s idle would get 0.1 s. Its timer stays as a
        # backstop that never fires before ours do.
        "keepalive_timeout": limits.keep_alive_timeout_s + limits.header_timeout_s + 1.0,
        "logger": ProtocolLog(log),
        "access_log": None,
    }
    # handler_cancellation: a client disconnect cancels its handler, whose finally aborts
    # the request in the engine (aiohttp's default lets it run to the end for nobody)
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=shutdown_timeout_s, **handler_kwargs
    )
    await runner.setup()
    site = GuardedSite(runner, host, port, ConnectionGuard(limits, log), handler_kwargs)
    await site.start()
    return runner, site
