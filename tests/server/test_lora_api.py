"""LoRA serving on the server (server/lora.py, server/lora_api.py, server/models.py) against
the fake engine: --lora-modules, adapters in /v1/models, selection by `model`, and the
runtime load/unload endpoints with every refusal."""

from __future__ import annotations

import argparse
import asyncio
import json

import openai
import pytest

from jaxserve.cli import main as cli_main
from jaxserve.lora.request import LoRARequest
from server import lora_api
from server.app import make_app
from server.args import add_server_args
from server.lora import LoRAModule, check_lora_modules
from server.serve import serve
from tests.server.fake_engine import SCRIPT, FakeEngine

LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
BASE = "fake-model"


def make_adapter(root, name: str) -> str:
    """A directory the fake engine accepts as an adapter (it reads adapter_config.json only)."""
    d = root / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    return str(d)


@pytest.fixture
def lora_engine() -> FakeEngine:
    return FakeEngine(enable_lora=True)


@pytest.fixture
def make_client(aiohttp_client, lora_engine):
    async def make(engine: FakeEngine | None = None, **kwargs):
        app = make_app(lora_engine if engine is None else engine, **kwargs)
        return await aiohttp_client(app, server_kwargs={"handler_cancellation": True})

    return make


async def _error(r, status: int) -> dict:
    assert r.status == status, await r.text()
    return (await r.json())["error"]


# ---- --lora-modules ------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    return parser.parse_args(list(argv))


def test_lora_modules_parse_both_forms():
    ns = _parse(
        "--lora-modules",
        "sql=/a/sql",
        '{"name": "chat", "path": "/a/b,c", "base_model_name": "m"}',
        "--lora-modules",
        "eq=/p=q",
    )
    assert ns.lora_modules == [
        LoRAModule("sql", "/a/sql"),
        LoRAModule("chat", "/a/b,c", "m"),  # a comma in a JSON path is fine
        LoRAModule("eq", "/p=q"),  # name=path splits at the first "="
    ]
    assert _parse().lora_modules == [] and _parse().runtime_lora_updating is True
    assert _parse("--no-runtime-lora-updating").runtime_lora_updating is False


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("noequals", "expected name=path"),
        ("=/path", "expected name=path"),
        ('{"name": "a"', "invalid JSON"),
        ('{"name": "a"}', "path must be a non-empty string"),
        ('{"name": "a", "path": "/p", "rank": 8}', "unknown field(s) rank"),
        ('{"name": 3, "path": "/p"}', "name must be a non-empty string"),
    ],
)
def test_lora_modules_bad_values(capsys, value, expect):
    with pytest.raises(SystemExit):
        _parse("--lora-modules", value)
    err = capsys.readouterr().err
    assert "--lora-modules" in err and expect in err


def test_lora_modules_need_enable_lora():
    modules, expect = [LoRAModule("a", "/p")], "--lora-modules needs --enable-lora"
    with pytest.raises(ValueError, match=expect):
        check_lora_modules(modules, enable_lora=False, base_name=BASE)
    with pytest.raises(ValueError, match=expect):
        make_app(FakeEngine(), lora_modules=modules)
    check_lora_modules([], enable_lora=False, base_name=BASE)  # no modules: nothing to check


@pytest.mark.parametrize(
    ("modules", "expect"),
    [
        ([LoRAModule(BASE, "/p")], "is the served model's name"),
        ([LoRAModule("a", "/p"), LoRAModule("a", "/q")], "'a' is given twice"),
        ([LoRAModule("a", "/p", "other")], "base_model_name 'other' is not served"),
        ([LoRAModule("x" * 257, "/p")], "at most 256"),
    ],
)
def test_lora_module_names_are_checked(lora_engine, modules, expect):
    with pytest.raises(ValueError, match=expect):
        check_lora_modules(modules, enable_lora=True, base_name=BASE)
    with pytest.raises(ValueError, match=expect):
        make_app(lora_engine, lora_modules=modules)
    check_lora_modules([LoRAModule("a", "/p", BASE)], enable_lora=True, base_name=BASE)


def test_cli_refuses_lora_modules_before_starting_the_engine(monkeypatch, capsys):
    async def no_engine(*args):
        raise AssertionError("the engine must not start")

    monkeypatch.setattr("server.serve.create_engine", no_engine)
    argv = ["serve", "--model", "m", "--lora-modules", "a=/p"]
    assert cli_main(argv) == 2
    assert "--lora-modules needs --enable-lora" in capsys.readouterr().err
    # with --enable-lora the name checks run before the engine too ("m" is the served name)
    assert cli_main([*argv[:-1], "m=/p", "--enable-lora"]) == 2
    assert "is the served model's name" in capsys.readouterr().err


async def test_lora_modules_are_loaded_at_startup(make_client, lora_engine, tmp_path):
    modules = [
        LoRAModule("sql", make_adapter(tmp_path, "sql")),
        LoRAModule("chat", make_adapter(tmp_path, "chat"), BASE),
    ]
    client = await make_client(lora_modules=modules)
    assert [(x.lora_name, x.lora_int_id) for x in lora_engine.loras.values()] == [
        ("sql", 1),
        ("chat", 2),
    ]
    models = (await (await client.get("/v1/models")).json())["data"]
    assert [m["id"] for m in models] == [BASE, "sql", "chat"]


async def test_a_bad_lora_module_fails_the_startup(lora_engine, tmp_path):
    good = LoRAModule("good", make_adapter(tmp_path, "good"))
    (tmp_path / "empty").mkdir()
    bad = LoRAModule("bad", str(tmp_path / "empty"))
    ns = _parse("--port", "0", "--lora-modules", "good=x", "bad=y")
    ns.lora_modules = [good, bad]
    with pytest.raises(ValueError) as e:
        await serve(ns, lora_engine)
    assert str(e.value).startswith(f"--lora-modules bad={bad.path}: ")
    assert "adapter_config.json" in str(e.value)
    assert lora_engine.dead == "shut down"  # serve() stopped the engine it was given


# ---- /v1/models and selection by `model` ---------------------------------------------------


async def _load(client, name: str, path: str) -> None:
    r = await client.post(LOAD, json={"lora_name": name, "lora_path": path})
    assert r.status == 200, await r.text()
    assert await r.text() == f"Success: LoRA adapter '{name}' added successfully."
    assert r.content_type == "text/plain"


async def test_models_list_adapters_after_the_base(make_client, tmp_path):
    client = await make_client()
    path = make_adapter(tmp_path, "sql")
    await _load(client, "sql", path)
    data = (await (await client.get("/v1/models")).json())["data"]
    assert [m["id"] for m in data] == [BASE, "sql"]
    assert data[0]["parent"] is None and data[0]["root"] == BASE
    assert data[1] == {**data[1], "object": "model", "root": path, "parent": BASE}
    r = await client.get("/v1/models/sql")
    assert r.status == 200 and (await r.json())["parent"] == BASE
    err = await _error(await client.get("/v1/models/nope"), 404)
    assert err["param"] == "model" and "1 LoRA adapter " in err["message"]


def _body(endpoint: str, model: str | None, stream: bool) -> dict:
    body: dict = {"max_tokens": 3, "stream": stream}
    if model is not None:
        body["model"] = model
    if endpoint == "/v1/completions":
        body["prompt"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    return body


async def _text_and_model(r, stream: bool) -> tuple[str, str]:
    assert r.status == 200, await r.text()
    if not stream:
        out = await r.json()
        choice = out["choices"][0]
        return choice.get("text") or choice["message"]["content"], out["model"]
    text, models = "", set()
    for line in (await r.text()).splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            models.add(chunk["model"])
            for c in chunk["choices"]:
                text += c.get("text") or c.get("delta", {}).get("content") or ""
    assert len(models) == 1
    return text, models.pop()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
async def test_model_selects_the_adapter(make_client, lora_engine, tmp_path, endpoint, stream):
    client = await make_client()
    await _load(client, "sql", make_adapter(tmp_path, "sql"))
    await _load(client, "chat", make_adapter(tmp_path, "chat"))
    expected = {
        "chat": lora_engine.loras[2],
        "sql": lora_engine.loras[1],
        BASE: None,
        None: None,
    }
    for model, lora in expected.items():
        before = set(lora_engine.lora_requests)
        r = await client.post(endpoint, json=_body(endpoint, model, stream))
        text, answered = await _text_and_model(r, stream)
        assert text == SCRIPT[:3]
        # the response names what was selected: the adapter, else the served model
        assert answered == (BASE if model is None else model)
        (request_id,) = set(lora_engine.lora_requests) - before
        assert lora_engine.lora_requests[request_id] == lora, model
    assert lora_engine.loras[2] == LoRARequest("chat", 2, str(tmp_path / "chat"))


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
async def test_unknown_model_is_404_naming_model(make_client, lora_engine, tmp_path, endpoint):
    client = await make_client()
    # no adapter loaded: today's message, word for word
    err = await _error(await client.post(endpoint, json=_body(endpoint, "sq", False)), 404)
    assert err["message"] == f"the model 'sq' does not exist; this server serves '{BASE}'"
    assert err["param"] == "model" and err["code"] == "model_not_found"
    await _load(client, "sql", make_adapter(tmp_path, "sql"))
    await _load(client, "sql2", make_adapter(tmp_path, "sql2"))
    err = await _error(await client.post(endpoint, json=_body(endpoint, "sq", True)), 404)
    assert err["param"] == "model" and "and 2 LoRA adapters" in err["message"]
    assert lora_engine.requests == []


async def test_adapters_on_the_other_model_endpoints(make_client, tmp_path):
    client = await make_client()
    await _load(client, "sql", make_adapter(tmp_path, "sql"))
    # adapters share the served model's tokenizer
    r = await client.post("/tokenize", json={"model": "sql", "prompt": "ab"})
    assert r.status == 200 and (await r.json())["count"] == 2
    r = await client.post("/detokenize", json={"model": "sql", "tokens": [65]})
    assert r.status == 200
    # the engine embeds with the base model only: refused rather than ignored
    r = await client.post("/v1/embeddings", json={"model": "sql", "input": "a"})
    err = await _error(r, 400)
    assert err["param"] == "model" and "LoRA adapter" in err["message"]
    assert (await client.post("/v1/embeddings", json={"model": BASE, "input": "a"})).status == 200


# ---- load / unload -------------------------------------------------------------------------


async def test_load_unload_happy_path(make_client, lora_engine, tmp_path):
    client = await make_client()
    path = make_adapter(tmp_path, "sql")
    await _load(client, "sql", path)
    r = await client.post(UNLOAD, json={"lora_name": "sql"})
    assert r.status == 200
    assert await r.text() == "Success: LoRA adapter 'sql' removed successfully."
    assert lora_engine.loras == {}
    assert [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]] == [BASE]
    body = _body("/v1/completions", "sql", False)
    assert (await _error(await client.post("/v1/completions", json=body), 404))["param"] == "model"
    # loaded again under the same name: a new id (the engine's cache keys on it)
    await _load(client, "sql", path)
    r = await client.post(UNLOAD, json={"lora_int_id": 2})  # vLLM's other selector
    assert r.status == 200, await r.text()
    assert lora_engine.lora_calls == [("add", 1), ("remove", 1), ("add", 2), ("remove", 2)]


@pytest.mark.parametrize(
    ("body", "param", "expect"),
    [
        ({"lora_name": "a"}, "lora_path", "lora_path is required"),
        ({"lora_path": "/p"}, "lora_name", "lora_name is required"),
        ({"lora_name": 3, "lora_path": "/p"}, "lora_name", "Expected `str`"),
        ({"lora_name": "a", "lora_path": ["/p"]}, "lora_path", "Expected `str`"),
        ({"lora_name": "", "lora_path": "/p"}, "lora_name", "length >= 1"),
        ({"lora_name": "a", "lora_path": "/p", "x": 1}, "x", "unknown field"),
        ({"lora_name": BASE, "lora_path": "/p"}, "lora_name", "served model's name"),
        ({"lora_name": "a", "lora_path": "/no/such/dir"}, "lora_path", "is not a directory"),
        ({"lora_name": "a", "lora_path": "/p\u0000"}, "lora_path", "NUL"),
    ],
)
async def test_load_refusals(make_client, lora_engine, body, param, expect):
    client = await make_client()
    err = await _error(await client.post(LOAD, json=body), 400)
    assert err["param"] == param and expect in err["message"], err
    assert lora_engine.loras == {} and lora_engine.lora_calls == []


async def test_load_refusals_that_need_a_directory(make_client, lora_engine, tmp_path):
    client = await make_client()
    (tmp_path / "empty").mkdir()
    r = await client.post(LOAD, json={"lora_name": "a", "lora_path": str(tmp_path / "empty")})
    err = await _error(r, 400)
    assert err["param"] == "lora_path" and "adapter_config.json" in err["message"]
    await _load(client, "a", make_adapter(tmp_path, "a"))  # the failed load took nothing
    r = await client.post(LOAD, json={"lora_name": "a", "lora_path": make_adapter(tmp_path, "b")})
    err = await _error(r, 400)
    assert err["param"] == "lora_name" and "already been loaded" in err["message"]
    assert list(lora_engine.loras.values()) == [LoRARequest("a", 2, str(tmp_path / "a"))]


async def test_unload_refusals(make_client, lora_engine, tmp_path):
    client = await make_client()
    await _load(client, "a", make_adapter(tmp_path, "a"))
    await _load(client, "b", make_adapter(tmp_path, "b"))
    cases = [
        ({"lora_name": "zzz"}, 404, "lora_name"),
        ({"lora_int_id": 7}, 404, "lora_int_id"),
        ({}, 400, "lora_name"),
        ({"lora_name": "a", "lora_int_id": 2}, 400, "lora_int_id"),  # 2 is "b"
        ({"lora_int_id": 0}, 400, "lora_int_id"),
        ({"lora_name": 1}, 400, "lora_name"),
        ({"lora_name": "a", "x": 1}, 400, "x"),
    ]
    for body, status, param in cases:
        err = await _error(await client.post(UNLOAD, json=body), status)
        assert err["param"] == param, (body, err)
    assert sorted(lora_engine.loras) == [1, 2]
    r = await client.post(UNLOAD, json={"lora_name": "a", "lora_int_id": 1})
    assert r.status == 200


async def test_concurrent_loads_of_one_name(make_client, lora_engine, tmp_path):
    client = await make_client()
    lora_engine.add_lora_delay = 0.05
    paths = [make_adapter(tmp_path, "x"), make_adapter(tmp_path, "y")]
    rs = await asyncio.gather(
        *(client.post(LOAD, json={"lora_name": "same", "lora_path": p}) for p in paths)
    )
    assert sorted(r.status for r in rs) == [200, 400]
    err = (await next(r for r in rs if r.status == 400).json())["error"]
    assert err["param"] == "lora_name" and "is being loaded" in err["message"]
    assert [x.lora_name for x in lora_engine.loras.values()] == ["same"]
    # the name is selectable only once its load returned; unload of a loading one is 404
    lora_engine.add_lora_delay = 0.2
    task = asyncio.ensure_future(
        client.post(LOAD, json={"lora_name": "slow", "lora_path": paths[0]})
    )
    await asyncio.sleep(0.05)
    body = _body("/v1/completions", "slow", False)
    assert (await client.post("/v1/completions", json=body)).status == 404
    err = await _error(await client.post(UNLOAD, json={"lora_name": "slow"}), 404)
    assert "still being loaded" in err["message"]
    assert (await task).status == 200
    assert (await client.post("/v1/completions", json=body)).status == 200


async def test_unload_waits_for_running_requests(make_client, lora_engine, tmp_path):
    client = await make_client()
    await _load(client, "a", make_adapter(tmp_path, "a"))
    lora_engine.step_delay = 0.01
    body = {**_body("/v1/completions", "a", True), "max_tokens": 20}
    r = await client.post("/v1/completions", json=body)
    assert r.status == 200
    await r.content.readuntil(b"\n\n")  # the request runs in the engine with the adapter
    unload = asyncio.ensure_future(client.post(UNLOAD, json={"lora_name": "a"}))
    await asyncio.sleep(0.02)
    # unselectable at once, while the engine still finishes the running request
    assert (await client.post("/v1/completions", json=body)).status == 404
    assert not unload.done()
    rest = await r.text()
    assert '"finish_reason":"length"' in rest.replace(" ", "") and rest.endswith("[DONE]\n\n")
    assert (await unload).status == 200
    assert lora_engine.loras == {} and not lora_engine.active


# ---- protection, presence, documentation ---------------------------------------------------


async def test_api_key_guards_load_and_unload(make_client, lora_engine, tmp_path):
    client = await make_client(api_key="k")
    body = {"lora_name": "a", "lora_path": make_adapter(tmp_path, "a")}
    assert (await client.post(LOAD, json=body)).status == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await client.post(LOAD, json=body, headers=wrong)).status == 401
    assert lora_engine.loras == {}
    auth = {"Authorization": "Bearer k"}
    assert (await client.post(LOAD, json=body, headers=auth)).status == 200
    assert (await client.post(UNLOAD, json={"lora_name": "a"})).status == 401
    assert len(lora_engine.loras) == 1
    assert (await client.post(UNLOAD, json={"lora_name": "a"}, headers=auth)).status == 200


@pytest.mark.parametrize("how", ["no --enable-lora", "--no-runtime-lora-updating"])
async def test_routes_absent_unless_enabled(make_client, lora_engine, tmp_path, how):
    if how == "no --enable-lora":
        client = await make_client(FakeEngine())
    else:
        client = await make_client(runtime_lora_updating=False)
    for path in (LOAD, UNLOAD):
        err = await _error(await client.post(path, json={"lora_name": "a", "lora_path": "/"}), 404)
        assert err["code"] == "not_found"
    spec = await (await client.get("/openapi.json")).json()
    assert LOAD not in spec["paths"] and UNLOAD not in spec["paths"]


async def test_openapi_documents_the_lora_routes(make_client):
    client = await make_client()
    spec = await (await client.get("/openapi.json")).json()
    for method, path, _ in lora_api.ROUTES:
        op = spec["paths"][path][method.lower()]
        assert "text/plain" in op["responses"]["200"]["content"]
    ref = spec["paths"][LOAD]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = spec["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]["properties"]
    assert set(props) == {"lora_name", "lora_path"}
    assert "parent" in spec["components"]["schemas"]["ModelCard"]["properties"]


async def test_openai_client_selects_an_adapter(make_client, lora_engine, tmp_path):
    client = await make_client()
    await _load(client, "sql", make_adapter(tmp_path, "sql"))
    oai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    async with oai:
        models = await oai.models.list()
        assert [m.id for m in models.data] == [BASE, "sql"]
        assert models.data[1].model_extra["parent"] == BASE
        c = await oai.completions.create(model="sql", prompt="Hi", max_tokens=4)
        assert c.model == "sql" and c.choices[0].text == SCRIPT[:4]
        chat = await oai.chat.completions.create(
            model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert chat.model == "sql"
        with pytest.raises(openai.NotFoundError) as e:
            await oai.completions.create(model="sq", prompt="x")
        assert e.value.body["param"] == "model"
    assert list(lora_engine.lora_requests.values()) == [lora_engine.loras[1]] * 2


async def test_engine_refusing_the_adapter_names_model(make_client, lora_engine, tmp_path):
    from server.state import STATE_KEY

    client = await make_client()
    await _load(client, "a", make_adapter(tmp_path, "a"))
    body = _body("/v1/completions", "a", False)
    # the engine lost it (still registered here): its ValueError is a 400 naming `model`
    await lora_engine.remove_lora(1)
    err = await _error(await client.post("/v1/completions", json=body), 400)
    assert err["param"] == "model" and "not loaded" in err["message"]
    # an unload between the lookup and the engine call: 404, as for a name never loaded
    await _load(client, "b", make_adapter(tmp_path, "b"))
    registry = client.app[STATE_KEY].loras
    generate = lora_engine.generate

    def unloaded_meanwhile(*args, **kwargs):
        registry._loaded.pop("b")
        lora_engine.loras.pop(2)
        return generate(*args, **kwargs)

    lora_engine.generate = unloaded_meanwhile
    for stream in (False, True):
        registry._loaded["b"] = LoRARequest("b", 2, str(tmp_path / "b"))
        lora_engine.loras[2] = registry._loaded["b"]
        body = _body("/v1/completions", "b", stream)
        err = await _error(await client.post("/v1/completions", json=body), 404)
        assert err["param"] == "model" and err["code"] == "model_not_found"


async def test_a_dead_engine_changes_nothing(make_client, lora_engine, tmp_path):
    client = await make_client()
    await _load(client, "a", make_adapter(tmp_path, "a"))
    lora_engine.dead = "core exited"
    body = {"lora_name": "b", "lora_path": make_adapter(tmp_path, "b")}
    assert (await _error(await client.post(LOAD, json=body), 503))["code"] == "engine_unavailable"
    assert (await client.post(UNLOAD, json={"lora_name": "a"})).status == 503
    lora_engine.dead = None
    # the unload did not happen, so "a" is still served; "b" was not taken
    data = (await (await client.get("/v1/models")).json())["data"]
    assert [m["id"] for m in data] == [BASE, "a"]
    await _load(client, "b", body["lora_path"])
    assert (await client.post(UNLOAD, json={"lora_name": "a"})).status == 200


async def test_a_client_leaving_mid_load_leaves_no_orphan(make_client, lora_engine, tmp_path):
    client = await make_client()
    lora_engine.add_lora_delay = 0.1
    body = {"lora_name": "a", "lora_path": make_adapter(tmp_path, "a")}
    task = asyncio.ensure_future(client.post(LOAD, json=body))
    await asyncio.sleep(0.03)
    task.cancel()  # the connection drops while the engine loads
    await asyncio.sleep(0.15)
    # the load completed and is registered: the engine holds nothing the server does not know
    assert list(lora_engine.loras) == [1]
    data = (await (await client.get("/v1/models")).json())["data"]
    assert [m["id"] for m in data] == [BASE, "a"]
