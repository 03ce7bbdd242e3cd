"""Browser safety (server/security.py): Host check on loopback, Origin/CORS, JSON content type."""

from __future__ import annotations

import pytest

from server.app import make_app
from server.security import BrowserPolicy, is_loopback

BODY = {"prompt": "hi", "max_tokens": 2}


@pytest.fixture
def make_client(aiohttp_client, engine):
    async def make(**kwargs):
        app = make_app(engine, **{"bind_host": "127.0.0.1", **kwargs})
        return await aiohttp_client(app, server_kwargs={"handler_cancellation": True})

    return make


# ---- Host (DNS rebinding) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST", "127.0.0.2:1", None]
)
async def test_loopback_names_are_served(make_client, host):
    client = await make_client()
    headers = {} if host is None else {"Host": host}
    r = await client.post("/v1/completions", json=BODY, headers=headers)
    assert r.status == 200, await r.text()


@pytest.mark.parametrize("host", ["evil.example:8000", "evil.example", "127.0.0.1.evil.example"])
async def test_a_rebinding_host_is_refused(make_client, engine, host):
    client = await make_client()
    r = await client.post("/v1/completions", json=BODY, headers={"Host": host})
    assert r.status == 403
    err = (await r.json())["error"]
    assert err["code"] == "host_not_allowed" and "--allowed-hosts" in err["message"]
    r = await client.get("/v1/models", headers={"Host": host})  # reads are refused too
    assert r.status == 403
    assert engine.requests == []


async def test_allowed_hosts_are_served(make_client):
    client = await make_client(allowed_hosts=["api.internal"])
    r = await client.get("/v1/models", headers={"Host": "API.internal:443"})
    assert r.status == 200
    r = await client.get("/v1/models", headers={"Host": "other.internal"})
    assert r.status == 403
    client = await make_client(allowed_hosts=["*"])
    assert (await client.get("/v1/models", headers={"Host": "any.name"})).status == 200


async def test_no_host_check_when_not_bound_to_loopback(make_client):
    client = await make_client(bind_host="0.0.0.0")
    assert (await client.get("/v1/models", headers={"Host": "gpu-box.lan:8000"})).status == 200


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"]))
    assert all(map(is_loopback, ["a.localhost", "localhost."]))
    assert not any(map(is_loopback, ["0.0.0.0", "", None, "::", "10.0.0.1", "localhost.evil"]))


# ---- Origin / CORS ----------------------------------------------------------------------


async def test_cors_is_off_by_default(make_client, engine):
    client = await make_client()
    r = await client.post("/v1/completions", json=BODY, headers={"Origin": "https://evil.example"})
    assert r.status == 403
    err = (await r.json())["error"]
    assert err["code"] == "origin_not_allowed" and "--allowed-origins" in err["message"]
    assert "Access-Control-Allow-Origin" not in r.headers
    r = await client.options(
        "/v1/completions",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    assert engine.requests == []
    # clients that are not browsers send no Origin
    assert (await client.post("/v1/completions", json=BODY)).status == 200


async def test_allowed_origins_get_preflight_and_cors_headers(make_client):
    origin = "https://app.example"
    client = await make_client(allowed_origins=[origin])
    r = await client.options(
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "x-stainless-os" in r.headers["Access-Control-Allow-Headers"]
    assert r.headers["Vary"] == "Origin"
    r = await client.post("/v1/completions", json=BODY, headers={"Origin": origin})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == origin
    # a stream gets them too (its headers go out before the handler returns)
    r = await client.post(
        "/v1/completions", json={**BODY, "stream": True}, headers={"Origin": origin}
    )
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == origin
    await r.read()
    # errors too, so the page can read why
    r = await client.post("/v1/completions", json={"max_tokens": 2}, headers={"Origin": origin})
    assert r.status == 400 and r.headers["Access-Control-Allow-Origin"] == origin
    # another origin still gets nothing
    r = await client.post("/v1/completions", json=BODY, headers={"Origin": "https://b.example"})
    assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers


async def test_wildcard_origin(make_client):
    client = await make_client(allowed_origins=["*"])
    r = await client.get("/v1/models", headers={"Origin": "https://any.example"})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"


async def test_a_preflight_needs_no_api_key(make_client):
    origin = "https://app.example"
    client = await make_client(allowed_origins=[origin], api_key="sekret")
    r = await client.options(
        "/v1/completions", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
    )
    assert r.status == 204
    r = await client.post("/v1/completions", json=BODY, headers={"Origin": origin})
    assert r.status == 401  # the actual request still does


# ---- Content-Type -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
async def test_post_bodies_must_be_declared_json(make_client, engine, path, content_type):
    client = await make_client()
    if content_type is None:  # no header at all (aiohttp's client would add its own)
        kw = {"skip_auto_headers": ["Content-Type"]}
    else:
        kw = {"headers": {"Content-Type": content_type}}
    r = await client.post(path, data=b'{"prompt": "hi"}', **kw)
    assert r.status == 415
    err = (await r.json())["error"]
    assert err["code"] == "unsupported_media_type" and "Content-Type" in err["message"]
    assert engine.requests == []


async def test_json_with_a_charset_is_fine(make_client):
    client = await make_client()
    r = await client.post(
        "/tokenize",
        data=b'{"prompt": "hi"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status == 200, await r.text()


async def test_unknown_routes_stay_404_and_gets_need_no_content_type(make_client):
    client = await make_client()
    r = await client.post("/v1/nope", data=b"x", headers={"Content-Type": "text/plain"})
    assert r.status == 404
    assert (await client.get("/v1/models")).status == 200


def test_policy_normalises_its_inputs():
    p = BrowserPolicy.make("localhost", ["API.Internal."], ["https://App.example/"])
    assert p.check_host and p.host_allowed("api.internal:8000")
    assert p.origin_allowed("https://app.example")
    assert not BrowserPolicy.make("127.0.0.1", ["*"]).check_host


# ---- control tokens in chat messages ------------------------------------------------------


async def test_control_token_spellings_in_messages_stay_text(make_client, engine):
    eos = engine.tokenizer.eos_token_id
    body = {"messages": [{"role": "user", "content": "hi<eos>there"}]}
    client = await make_client()
    tokens = (await (await client.post("/tokenize", json=body)).json())["tokens"]
    assert eos not in tokens and engine.tokenizer.decode(tokens).count("<eos>") == 1
    r = await client.post("/v1/chat/completions", json={**body, "max_tokens": 2})
    assert r.status == 200 and eos not in engine.requests[-1][1]
    # --allow-special-tokens-in-content: the old behaviour
    client = await make_client(allow_special_tokens_in_content=True)
    tokens = (await (await client.post("/tokenize", json=body)).json())["tokens"]
    assert tokens.count(eos) == 1
