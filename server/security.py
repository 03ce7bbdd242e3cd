"""Browser safety: what keeps a web page the user visits from driving the local server.

With no API key (the default), a loopback server is reachable from every page in the user's
browser. Three checks, in this order, in security_middleware:

1. Host (DNS rebinding): when the server is bound to loopback, a request whose Host names
   anything but a loopback address (127.0.0.1, localhost, [::1], ...) or an --allowed-hosts
   name is refused. A rebinding page can point its own name at 127.0.0.1 but cannot make the
   browser send another Host. Only the name is checked, not the port: a rebinding page is on
   the server's port anyway, and ssh tunnels or port-forwards legitimately change it.
2. Origin (CORS and CSRF): browsers mark cross-origin requests with Origin; one whose origin
   is not in --allowed-origins is refused (CORS is off by default), and preflights of the
   allowed ones are answered, with Access-Control-Allow-Origin added to their responses.
3. Content-Type: POST bodies must be declared application/json. A page can send a text/plain
   or form body cross-origin without a preflight; application/json always needs one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import hdrs, web

from server.errors import APIError

# where security_middleware leaves the origin a response must be allowed for
_CORS_ORIGIN_KEY = web.RequestKey("cors_origin", str)
_CORS_METHODS = "GET, POST, OPTIONS"
# headers a browser may read from a cross-origin response (besides the CORS-safelisted ones)
_CORS_EXPOSE = "Retry-After"
# seconds a browser may cache a preflight's answer
_CORS_MAX_AGE_S = 600


def is_loopback(host: str | None) -> bool:
    """Whether a bind address (or a Host name) is a loopback one; names are not resolved."""
    if not host:
        return False
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class BrowserPolicy:
    check_host: bool  # bound to loopback: Host must be a loopback name or an allowed host
    allowed_hosts: frozenset[str]  # extra Host names (lowercase, no port); "*": any Host
    allowed_origins: frozenset[str]  # origins allowed cross-origin access; "*": any; empty: none

    @classmethod
    def make(
        cls,
        bind_host: str | None,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
    ) -> BrowserPolicy:
        """`bind_host`: the address the server listens on (None: unknown, no Host check)."""
        hosts = frozenset(_host_name(h) for h in allowed_hosts if h)
        origins = frozenset(_origin(o) for o in allowed_origins if o)
        return cls(
            check_host=is_loopback(bind_host) and "*" not in hosts,
            allowed_hosts=hosts,
            allowed_origins=origins,
        )

    def host_allowed(self, host_header: str | None) -> bool:
        if not self.check_host or host_header is None:  # no Host: not a browser
            return True
        name = _host_name(host_header)
        return is_loopback(name) or name in self.allowed_hosts

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.allowed_origins or _origin(origin) in self.allowed_origins


POLICY_KEY = web.AppKey("browser_policy", BrowserPolicy)


def _host_name(value: str) -> str:
    """The name part of a Host header value: "[::1]:8000" -> "::1", "Example.com." -> ..."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        name = value[1:end] if end > 0 else value[1:]
    elif value.count(":") == 1:
        name = value.partition(":")[0]
    else:
        name = value
    return name.rstrip(".").lower()


def _origin(value: str) -> str:
    return value.strip().rstrip("/").lower()


@web.middleware
async def security_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    policy = request.app[POLICY_KEY]
    host = request.headers.get(hdrs.HOST)
    if not policy.host_allowed(host):
        raise APIError(
            403,
            f"Host header {host!r} is not an address of this server: a server bound to "
            "loopback answers only to loopback names such as 127.0.0.1, localhost and [::1] "
            "(DNS rebinding protection); start it with --allowed-hosts NAME to accept another",
            code="host_not_allowed",
        )
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None:
        if not policy.origin_allowed(origin):
            raise APIError(
                403,
                f"cross-origin requests from Origin {origin!r} are not allowed; start the "
                "server with --allowed-origins ORIGIN to allow a web page to call it",
                code="origin_not_allowed",
            )
        if request.method == hdrs.METH_OPTIONS and (
            hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        ):
            return _preflight(request, origin, policy)
        request[_CORS_ORIGIN_KEY] = "*" if "*" in policy.allowed_origins else origin
    if request.method == hdrs.METH_POST and request.match_info.http_exception is None:
        if request.content_type != "application/json":
            given = request.headers.get(hdrs.CONTENT_TYPE)
            got = f"got {given!r}" if given is not None else "the header is missing"
            raise APIError(
                415,
                f"Content-Type must be application/json ({got})",
                param="Content-Type",
                code="unsupported_media_type",
            )
    return await handler(request)


def _preflight(request: web.Request, origin: str, policy: BrowserPolicy) -> web.Response:
    asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
    return web.Response(
        status=204,
        headers={
            hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: "*" if "*" in policy.allowed_origins else origin,
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: _CORS_METHODS,
            # the origin is allowed, so are the headers its page sends (the openai JS client
            # sends several of its own besides Authorization and Content-Type)
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: asked or "Authorization, Content-Type",
            hdrs.ACCESS_CONTROL_MAX_AGE: str(_CORS_MAX_AGE_S),
            hdrs.VARY: "Origin",
        },
    )


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: an allowed cross-origin request's response (streams included,
    which is why this is a signal and not the middleware) may be read by its page."""
    allow = request.get(_CORS_ORIGIN_KEY)
    if allow is None:
        return
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allow
    response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = _CORS_EXPOSE
    if allow != "*":
        response.headers.add(hdrs.VARY, "Origin")
