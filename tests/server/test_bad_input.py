"""The bad-input suite: a real server on loopback (tests/server/conftest.py `live_server`) gets
what careless and hostile clients send, on every endpoint. After EACH case: the answer was
2xx or 4xx (never 5xx, never a hang), /health is 200, and a normal request still works.

Where a case must be refused, the 400 must name the field (`error.param`). NUL ("\\u0000")
is accepted as text (see jaxserve/sampling_params.py:check_text); lone surrogates are not.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pytest

from tests.server.conftest import LIVE_API_KEY, LIVE_MODEL
from tests.server.raw_http import exchange, request_bytes, send_and_hang_up

C, CHAT, EMB, TOK, DETOK = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
)
AUTH = f"Bearer {LIVE_API_KEY}"
VOCAB = 49152  # SmolLM2's tokenizer, which the tiny model uses
MAX_MODEL_LEN = 256
MSG = [{"role": "user", "content": "hi"}]
BASE = {
    C: {"prompt": "hi", "max_tokens": 1},
    CHAT: {"messages": MSG, "max_tokens": 1},
    EMB: {"input": "hi"},
    TOK: {"prompt": "hi"},
    DETOK: {"tokens": [1]},
}
SUR = "\ud800"  # a lone surrogate: json.dumps writes it as the escape "\ud800"


@dataclass
class Case:
    id: str
    path: str = C
    # a dict is JSON-encoded (surrogates as escapes); bytes go out as they are
    body: dict | bytes = b""
    headers: dict = field(default_factory=dict)
    method: str = "POST"
    # acceptable statuses (every one of them 2xx or 4xx)
    expect: tuple[int, ...] = (400,)
    # the field a 400 must name (error.param is it, or a path inside it)
    param: str | None = None
    # "answer": read the reply; "hangup": send, maybe read `read_bytes`, close
    mode: str = "answer"
    read_bytes: int = 0


def with_(path: str, **changes) -> dict:
    return {**BASE[path], **changes}


def _int_cases() -> list[Case]:
    """Overflow (and underflow) in every integer field, for each endpoint that has one."""
    values = {"2e31": 2**31, "2e63": 2**63, "2e64": 2**64, "2e70": 2**70, "neg": -(2**63) - 1}
    # field -> (how to place the value in the body, the valid range on this server)
    c_fields = {
        "max_tokens": (lambda v: {"max_tokens": v}, (1, MAX_MODEL_LEN)),
        "top_k": (lambda v: {"top_k": v}, (-1, 2**31 - 1)),
        "n": (lambda v: {"n": v}, (1, 16)),
        "seed": (lambda v: {"seed": v}, (0, 2**63 - 1)),
        "min_tokens": (lambda v: {"min_tokens": v}, (0, 1)),
        "logprobs": (lambda v: {"logprobs": v}, (0, 20)),
        "priority": (lambda v: {"priority": v}, (-(2**31), 2**31 - 1)),
        "stop_token_ids": (lambda v: {"stop_token_ids": [v]}, (0, VOCAB - 1)),
        "prompt": (lambda v: {"prompt": [1, v]}, (0, VOCAB - 1)),
    }
    chat_fields = {
        "max_completion_tokens": (lambda v: {"max_completion_tokens": v}, (1, MAX_MODEL_LEN)),
        "top_logprobs": (lambda v: {"logprobs": True, "top_logprobs": v}, (0, 20)),
        "top_k": (lambda v: {"top_k": v}, (-1, 2**31 - 1)),
        "seed": (lambda v: {"seed": v}, (0, 2**63 - 1)),
        "priority": (lambda v: {"priority": v}, (-(2**31), 2**31 - 1)),
    }
    cases = []
    for path, fields in ((C, c_fields), (CHAT, chat_fields)):
        for name, (place, (lo, hi)) in fields.items():
            for tag, v in values.items():
                ok = lo <= v <= hi
                cases.append(
                    Case(
                        f"int-{path}-{name}-{tag}",
                        path,
                        with_(path, **place(v)),
                        expect=(200,) if ok else (400,),
                        param=None if ok else name,
                    )
                )
    for tag, v in values.items():
        cases.append(Case(f"int-emb-input-{tag}", EMB, {"input": [1, v]}, param="input"))
        cases.append(Case(f"int-detok-{tag}", DETOK, {"tokens": [v]}, param="tokens"))
    # the largest values each field stores are fine
    cases.append(Case("int-top_k-max", C, with_(C, top_k=2**31 - 1), expect=(200,)))
    cases.append(Case("int-seed-max", C, with_(C, seed=2**63 - 1), expect=(200,)))
    # the smallest priority the body takes; this server schedules fcfs, which refuses any
    # priority but 0 rather than ignore it (as vLLM does)
    cases.append(Case("int-priority-min", C, with_(C, priority=-(2**31)), param="priority"))
    cases.append(Case("int-priority-zero", C, with_(C, priority=0), expect=(200,)))
    cases.append(Case("int-top_k-minus-1", C, with_(C, top_k=-1), expect=(200,)))
    cases.append(Case("int-top_k-minus-2", C, with_(C, top_k=-2), param="top_k"))
    return cases


def _float_cases() -> list[Case]:
    fields = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"]
    fields.append("repetition_penalty")
    cases = []
    for name in fields:
        for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
            raw = b'{"prompt": "hi", "max_tokens": 1, "%s": %s}' % (name.encode(), literal.encode())
            # NaN/Infinity are not JSON at all (no field to name); 1e999 is, and overflows
            param = name if literal == "1e999" else None
            cases.append(Case(f"float-{name}-{literal}", C, raw, param=param))
        raw = b'{"messages": [{"role": "user", "content": "hi"}], "%s": -1e999}' % name.encode()
        cases.append(Case(f"float-chat-{name}-overflow", CHAT, raw, param=name))
    return cases


def _type_cases() -> list[Case]:
    wrong = [
        (C, "prompt", None),
        (C, "prompt", {}),
        (C, "prompt", True),
        (C, "prompt", [1, "a"]),
        (C, "prompt", [[1], "a"]),
        (C, "prompt", [[]]),
        (C, "max_tokens", "1"),
        (C, "max_tokens", 1.5),
        (C, "max_tokens", True),
        (C, "temperature", "hot"),
        (C, "temperature", [0.5]),
        (C, "stop", 5),
        (C, "stop", [1]),
        (C, "stop", {"a": "b"}),
        (C, "stream", "true"),
        (C, "echo", 1),
        (C, "stream_options", []),
        (C, "model", 3),
        (C, "user", 5),
        (C, "cache_salt", ["x"]),
        (C, "logit_bias", {"a": 1}),
        (C, "logit_bias", {"1": 101}),
        (C, "response_format", {"type": "xml"}),
        (C, "guided_regex", 5),
        (C, "allowed_token_ids", []),
        (C, "bad_words", [""]),
        (C, "best_of", 2),
        (CHAT, "messages", {}),
        (CHAT, "messages", "hi"),
        (CHAT, "messages", [1]),
        (CHAT, "messages", []),
        (CHAT, "messages", [{"role": 1, "content": "x"}]),
        (CHAT, "messages", [{"role": "user", "content": {"a": 1}}]),
        (CHAT, "messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        (CHAT, "messages", [{"role": "user", "content": [{"text": "x"}]}]),
        (CHAT, "messages", [{"role": "user", "content": "x", "name": 5}]),
        (CHAT, "messages", [{"role": "", "content": "x"}]),
        (CHAT, "logprobs", 5),
        (CHAT, "add_generation_prompt", "no"),
        (CHAT, "tools", "x"),
        (CHAT, "tool_choice", "sometimes"),
        (CHAT, "chat_template_kwargs", {"a": {"b": 1}}),
        (EMB, "input", 5),
        (EMB, "input", [True]),
        (EMB, "input", [[1, "a"]]),
        (EMB, "encoding_format", 1),
        (EMB, "encoding_format", "int8"),
        (EMB, "dimensions", 3),
        (TOK, "prompt", 5),
        (TOK, "messages", "x"),
        (TOK, "add_special_tokens", "yes"),
        (DETOK, "tokens", "abc"),
        (DETOK, "tokens", [1.5]),
        (DETOK, "tokens", [True]),
        (DETOK, "tokens", [[1]]),
    ]
    cases = [
        Case(f"type-{i}-{path}-{name}", path, with_(path, **{name: v}), param=name)
        for i, (path, name, v) in enumerate(wrong)
    ]
    cases += [
        Case("type-tok-both", TOK, {"prompt": "a", "messages": MSG}, param="prompt"),
        Case("type-tok-neither", TOK, {}, param="prompt"),
        Case("type-detok-missing", DETOK, {}, param="tokens"),
        Case("type-chat-missing", CHAT, {"max_tokens": 1}, param="messages"),
        Case("type-emb-missing", EMB, {"model": LIVE_MODEL}, param="input"),
        Case("type-opts-without-stream", C, with_(C, stream_options={}), param="stream_options"),
        Case("type-top-logprobs-alone", CHAT, with_(CHAT, top_logprobs=2), param="top_logprobs"),
        Case(
            "type-prompt-logprobs-stream",
            C,
            with_(C, stream=True, prompt_logprobs=1),
            param="prompt_logprobs",
        ),
        Case(
            "type-logit-bias-oov",
            C,
            with_(C, logit_bias={str(VOCAB): 1}),
            param="logit_bias",
        ),
        Case("type-unknown-model", C, with_(C, model="gpt-4"), expect=(404,), param="model"),
        Case("type-prompt-oov", C, with_(C, prompt=[VOCAB]), param="prompt"),
        Case("type-detok-oov", DETOK, {"tokens": [VOCAB]}, param="tokens"),
        Case("type-stop-ids-oov", C, with_(C, stop_token_ids=[VOCAB]), param="stop_token_ids"),
        Case("type-min-gt-max", C, with_(C, min_tokens=5, max_tokens=2), param="min_tokens"),
    ]
    return cases


def _surrogate_cases() -> list[Case]:
    content = [{"role": "user", "content": [{"type": "text", "text": SUR}]}]
    places = [
        (C, {"prompt": SUR}, "prompt"),
        (C, {"prompt": ["ok", "a" + SUR]}, "prompt[1]"),
        (C, {"stop": SUR}, "stop"),
        (C, {"stop": ["ok", SUR]}, "stop[1]"),
        (C, {"cache_salt": SUR}, "cache_salt"),
        (C, {"model": SUR}, "model"),
        (C, {"user": SUR}, "user"),
        (C, {"prompt": "\udfff"}, "prompt"),
        (C, {"prompt": "\udc00\ud800"}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": SUR}]}, "messages[0].content"),
        (CHAT, {"messages": content}, "messages[0].content[0].text"),
        (CHAT, {"messages": [{"role": SUR, "content": "x"}]}, "messages[0].role"),
        (CHAT, {"messages": [{"role": "user", "content": "x", "name": SUR}]}, "messages[0].name"),
        (CHAT, {"stop": [SUR]}, "stop[0]"),
        (CHAT, {"cache_salt": SUR}, "cache_salt"),
        (EMB, {"input": SUR}, "input"),
        (EMB, {"input": ["a", SUR]}, "input[1]"),
        (EMB, {"user": SUR}, "user"),
        (TOK, {"prompt": SUR}, "prompt"),
        (TOK, {"prompt": None, "messages": [{"role": "user", "content": SUR}]}, "messages"),
        (DETOK, {"model": SUR}, "model"),
    ]
    cases = [
        Case(f"surrogate-{i}-{path}-{param}", path, with_(path, **change), param=param)
        for i, (path, change, param) in enumerate(places)
    ]
    cases.append(Case("surrogate-key", C, with_(C, **{SUR: 1})))
    return cases


def _nul_cases() -> list[Case]:
    """NUL is text: accepted everywhere a string is."""
    nul = "a\u0000b"
    return [
        Case("nul-prompt", C, with_(C, prompt=nul), expect=(200,)),
        Case("nul-stop", C, with_(C, stop=["\u0000"]), expect=(200,)),
        Case("nul-salt", C, with_(C, cache_salt=nul), expect=(200,)),
        Case("nul-user", C, with_(C, user=nul), expect=(200,)),
        Case(
            "nul-chat",
            CHAT,
            with_(CHAT, messages=[{"role": "user", "content": nul}]),
            expect=(200,),
        ),
        Case("nul-emb", EMB, {"input": nul}, expect=(200,)),
        Case("nul-tok", TOK, {"prompt": "\u0000"}, expect=(200,)),
    ]


def _huge_cases() -> list[Case]:
    long_text = "hello " * 200_000  # 1.2 MB: far over max_model_len once tokenized
    many = [{"role": "user", "content": "hi"}] * 3000
    return [
        Case("huge-prompt-text", C, with_(C, prompt=long_text), param="prompt"),
        Case("huge-prompt-ids", C, with_(C, prompt=[1] * 100_000), param="prompt"),
        Case("huge-prompt-list", C, with_(C, prompt=["a"] * 1000), param="prompt"),
        Case("huge-stop-list", C, with_(C, stop=["a"] * 1000), param="stop"),
        Case("huge-stop-string", C, with_(C, stop="a" * 100_000), param="stop"),
        Case("huge-stop-ids", C, with_(C, stop_token_ids=[1] * 1000), param="stop_token_ids"),
        Case("huge-n", C, with_(C, n=17), param="n"),
        Case(
            "huge-chat-content",
            CHAT,
            with_(CHAT, messages=[{"role": "user", "content": long_text}]),
            param="messages",
        ),
        Case("huge-chat-many", CHAT, with_(CHAT, messages=many), param="messages"),
        Case(
            "huge-role",
            CHAT,
            with_(CHAT, messages=[{"role": "u" * 10_000, "content": "x"}]),
            param="messages[0].role",
        ),
        Case("huge-emb-inputs", EMB, {"input": ["a"] * 100}, param="input"),
        Case("huge-emb-text", EMB, {"input": long_text}, param="input"),
        Case("huge-model", C, with_(C, model="m" * 10_000), param="model"),
        Case("huge-user", C, with_(C, user="u" * 10_000), param="user"),
        Case("huge-salt", C, with_(C, cache_salt="s" * 10_000), param="cache_salt"),
        Case("huge-tok", TOK, {"prompt": "hello " * 20_000}, expect=(200,)),
        Case("huge-detok", DETOK, {"tokens": [28] * 50_000}, expect=(200,)),
        Case("huge-body", C, b'{"prompt": "' + b"x" * (9 << 20) + b'"}', expect=(413,)),
    ]


def _deep_cases() -> list[Case]:
    deep = 100_000
    return [
        Case("deep-prompt", C, b'{"prompt": ' + b"[" * deep + b"]" * deep + b"}"),
        Case("deep-unknown", C, b'{"prompt": "x", "x": ' + b"[" * deep + b"]" * deep + b"}"),
        Case("deep-objects", C, b'{"a":' * deep + b"1" + b"}" * deep),
        Case("deep-array-body", C, b"[" * deep + b"]" * deep),
        Case(
            "deep-content",
            CHAT,
            b'{"messages": [{"role": "user", "content": ' + b"[" * deep + b"]" * deep + b"}]}",
        ),
        Case("deep-stop", C, b'{"prompt": "x", "stop": ' + b"[" * deep + b"]" * deep + b"}"),
    ]


def _body_cases() -> list[Case]:
    raw = [
        ("empty", b""),
        ("null", b"null"),
        ("array", b"[]"),
        ("string", b'"hi"'),
        ("number", b"1"),
        ("truncated", b'{"prompt": "hi", "max_tok'),
        ("trailing", b'{"prompt": "hi"} {}'),
        ("latin1", b'{"prompt": "caf\xe9"}'),
        ("bom", b'\xef\xbb\xbf{"prompt": "hi"}'),
        ("utf16", '{"prompt": "hi"}'.encode("utf-16")),
        ("nul-byte", b'{"prompt": "hi"\x00}'),
    ]
    cases = [Case(f"body-{name}-{path}", path, body) for name, body in raw for path in (C, CHAT)]
    cases.append(Case("body-dup-key", C, b'{"prompt": "hi", "prompt": 5}', expect=(200, 400)))
    cases.append(Case("body-detok-empty", DETOK, {"tokens": []}, expect=(200,)))
    cases.append(Case("body-tok-empty", TOK, {"prompt": ""}, expect=(200,)))
    return cases


def _header_cases() -> list[Case]:
    ok = json.dumps(BASE[C]).encode()
    return [
        Case("hdr-auth-non-utf8", C, ok, {"Authorization": b"Bearer \xff\xfe\x80"}, expect=(401,)),
        Case(
            "hdr-auth-key-plus-byte",
            C,
            ok,
            {"Authorization": AUTH.encode() + b"\xe9"},
            expect=(401,),
        ),
        Case("hdr-auth-missing", C, ok, {"Authorization": None}, expect=(401,)),
        Case("hdr-auth-wrong", C, ok, {"Authorization": "Bearer nope"}, expect=(401,)),
        Case("hdr-auth-basic", C, ok, {"Authorization": "Basic dXNlcjpwdw=="}, expect=(401,)),
        Case("hdr-length-abc", C, ok, {"Content-Length": "abc"}),
        Case("hdr-length-negative", C, ok, {"Content-Length": "-1"}),
        Case("hdr-length-and-chunked", C, ok, {"Transfer-Encoding": "chunked"}),
        Case(
            "hdr-bad-chunk",
            C,
            b"zz\r\nxx\r\n",
            {"Content-Length": None, "Transfer-Encoding": "chunked"},
        ),
        Case("hdr-line-too-long", C, ok, {"X-Long": "a" * 20_000}, expect=(400, 431)),
        Case("hdr-other-non-utf8", C, ok, {"X-Odd": b"\xff\xfe"}, expect=(200,)),
        Case("hdr-user-agent-ctl", C, ok, {"User-Agent": b"\x01\x02\xff"}, expect=(200, 400)),
        Case("hdr-expect-continue", C, ok, {"Expect": "100-continue"}, expect=(200, 417)),
        Case("hdr-huge-length-no-body", C, b"", {"Content-Length": str(10**12)}, expect=(413,)),
    ]


def _content_type_cases() -> list[Case]:
    ok = json.dumps(BASE[C]).encode()
    # text/plain and no content type are taken as JSON today; refusing them (415) is the
    # browser-safety change of issue 10 item 7. Either is a clean answer.
    return [
        Case("ct-text-plain", C, ok, {"Content-Type": "text/plain"}, expect=(200, 415)),
        Case("ct-missing", C, ok, {"Content-Type": None}, expect=(200, 415)),
        Case(
            "ct-form",
            C,
            b"prompt=hi",
            {"Content-Type": "application/x-www-form-urlencoded"},
            expect=(400, 415),
        ),
        Case(
            "ct-multipart",
            C,
            b"--x\r\n\r\nhi\r\n--x--",
            {"Content-Type": "multipart/form-data; boundary=x"},
            expect=(400, 415),
        ),
        Case(
            "ct-latin1",
            C,
            b'{"prompt": "caf\xe9"}',
            {"Content-Type": "application/json; charset=latin-1"},
            expect=(400, 415),
        ),
        Case("ct-garbage", C, ok, {"Content-Type": "\x01;;;=="}, expect=(200, 400, 415)),
        Case(
            "ct-json-utf8",
            C,
            ok,
            {"Content-Type": "application/json; charset=utf-8"},
            expect=(200,),
        ),
    ]


def _route_cases() -> list[Case]:
    return [
        Case("route-get-post-only", C, method="GET", expect=(405,)),
        Case("route-post-get-only", "/v1/models", b"{}", method="POST", expect=(405,)),
        Case("route-unknown", "/v1/nothing", b"{}", expect=(404,)),
        Case("route-bad-escape", "/v1/models/%ff%fe", method="GET", expect=(404,)),
        Case("route-long-url", "/v1/" + "a" * 20_000, method="GET", expect=(400, 404, 414)),
        Case("route-delete", C, method="DELETE", expect=(405,)),
    ]


def _hangup_cases() -> list[Case]:
    stream = json.dumps(with_(C, max_tokens=64, ignore_eos=True, stream=True)).encode()
    whole = json.dumps(with_(C, max_tokens=64, ignore_eos=True)).encode()
    chat = json.dumps(with_(CHAT, max_tokens=64, ignore_eos=True, stream=True)).encode()
    return [
        Case("hangup-mid-stream", C, stream, mode="hangup", read_bytes=200),
        Case("hangup-mid-chat-stream", CHAT, chat, mode="hangup", read_bytes=300),
        Case("hangup-before-answer", C, whole, mode="hangup"),
        Case("hangup-half-body", C, whole, {"Content-Length": str(2 * len(whole))}, mode="hangup"),
        Case(
            "hangup-half-chunked",
            C,
            b"ff\r\n" + whole[:20],
            {"Content-Length": None, "Transfer-Encoding": "chunked"},
            mode="hangup",
        ),
        Case("hangup-garbage", C, b"", mode="hangup"),
        Case("hangup-partial-headers", C, b"", mode="hangup"),
        Case("answer-garbage", C, b""),
    ]


CASES = [
    *_int_cases(),
    *_float_cases(),
    *_type_cases(),
    *_surrogate_cases(),
    *_nul_cases(),
    *_huge_cases(),
    *_deep_cases(),
    *_body_cases(),
    *_header_cases(),
    *_content_type_cases(),
    *_route_cases(),
    *_hangup_cases(),
]


def test_enough_distinct_cases():
    assert len(CASES) >= 150
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)


def _wire(server, case: Case) -> bytes:
    if case.id == "hangup-partial-headers":
        return f"POST {C} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Le".encode()
    if case.id in ("hangup-garbage", "answer-garbage"):
        return b"\x00\xff\r\n" * 100
    body = case.body
    if isinstance(body, dict):
        body = json.dumps(body).encode()  # ensure_ascii: surrogates travel as escapes
    headers = {"Authorization": AUTH, **case.headers}
    return request_bytes(server.port, case.method, case.path, body, headers)


def _healthy(server) -> None:
    """/health 200 and a normal one-token completion works."""
    health = exchange(server.port, request_bytes(server.port, "GET", "/health"))
    assert health.status == 200, health.body
    body = json.dumps({"prompt": "ok", "max_tokens": 1}).encode()
    ok = exchange(server.port, request_bytes(server.port, "POST", C, body, {"Authorization": AUTH}))
    assert ok.status == 200, ok.body
    assert ok.json()["usage"]["completion_tokens"] == 1


def _wait_idle(server, timeout: float = 10.0) -> None:
    """The engine holds no request: a hung-up one was aborted, a refused one never stayed
    registered (a leak would fill the waiting queue until every request got 429)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = server.metric("jaxserve_num_requests_running")
        waiting = server.metric("jaxserve_num_requests_waiting")
        if running == waiting == 0.0:
            return
        time.sleep(0.05)
    raise AssertionError(f"requests left in the engine: {running=} {waiting=}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(live_server, case: Case):
    data = _wire(live_server, case)
    if case.mode == "hangup":
        send_and_hang_up(live_server.port, data, read_bytes=case.read_bytes)
    else:
        reply = exchange(live_server.port, data)
        assert 200 <= reply.status < 500, (reply.status, reply.body[:500])
        assert reply.status in case.expect, (reply.status, reply.body[:500])
        if reply.status >= 400 and reply.headers.get("content-type", "").startswith(
            "application/json"
        ):
            err = reply.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            assert "Traceback" not in err["message"] and "/work" not in err["message"]
            if case.param is not None:
                p = err["param"] or ""
                assert p == case.param or p.startswith((case.param + "[", case.param + ".")), err
        elif case.param is not None:
            raise AssertionError(f"expected a JSON error naming {case.param}: {reply}")
    _wait_idle(live_server)
    _healthy(live_server)
