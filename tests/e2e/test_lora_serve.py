"""A real server with --enable-lora on the tiny model, driven by the openai client: adapters
selected by `model`, listed in /v1/models, loaded and unloaded at runtime, refused with a 4xx
naming the field, counted in /metrics; the server's tokens equal the offline engine's."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import openai
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.lora.request import LoRARequest
from tests.e2e.server_proc import Server
from tests.lora.peft_util import make_peft_adapter

PROMPT = [5, 17, 301, 2048, 77, 1000, 42]
ENGINE_ARGS = ["--max-model-len", "128", "--max-num-batched-tokens", "64", "--max-num-seqs", "8"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    out = []
    for i, targets in enumerate((["q_proj", "v_proj"], "all-linear")):
        d = tmp_path_factory.mktemp(f"serve-lora{i}")
        out.append(
            make_peft_adapter(tiny_model_dir, d, rank=8, alpha=16, target_modules=targets, seed=i)
        )
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, adapters):
    srv = Server(
        tmp_path_factory.mktemp("lora-serve"),
        "--no-warmup",
        "--enable-lora",
        "--max-loras",
        "2",
        "--lora-modules",
        f"ad0={adapters[0]}",
        model=str(tiny_model_dir),
        base_args=ENGINE_ARGS,
    )
    yield srv
    srv.stop()


def _post(server: Server, path: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(
        f"{server.url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _complete(client: openai.OpenAI, model: str) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0.0)
    return out.choices[0].text


def test_adapters_are_served_by_model_name_and_match_the_offline_engine(
    server, tiny_model_dir, adapters
):
    client = server.client()
    base_id = client.models.list().data[0].id
    models = {m.id: m for m in client.models.list().data}
    assert models["ad0"].parent == base_id and models["ad0"].root == str(adapters[0])
    served = {name: _complete(client, name) for name in (base_id, "ad0")}
    # streamed == not streamed, on the adapter
    stream = client.completions.create(
        model="ad0", prompt=PROMPT, max_tokens=8, temperature=0.0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == served["ad0"]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    with LLM(
        str(tiny_model_dir),
        enable_lora=True,
        max_loras=2,
        max_model_len=128,
        max_num_batched_tokens=64,
        enable_warmup=False,
        show_progress=False,
    ) as llm:
        lora = LoRARequest("ad0", 1, str(adapters[0]))
        prompt = {"prompt_token_ids": PROMPT}
        want_base = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
        want_ad0 = llm.generate([prompt], params, lora_request=lora, use_tqdm=False)
    assert served == {base_id: want_base, "ad0": want_ad0[0].outputs[0].text}
    assert served["ad0"] != served[base_id]


def test_runtime_load_unload_and_refusals(server, adapters, tmp_path):
    client = server.client()
    status, body = _post(
        server, "/v1/load_lora_adapter", {"lora_name": "ad1", "lora_path": str(adapters[1])}
    )
    assert status == 200, body
    chat = client.chat.completions.create(
        model="ad1", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.model == "ad1" and chat.choices[0].message.content is not None
    # a directory that is no adapter: 400 naming lora_path; the server serves on
    status, body = _post(
        server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(tmp_path)}
    )
    assert status == 400 and "lora_path" in body and "adapter_config.json" in body, body
    with pytest.raises(openai.NotFoundError) as e:
        _complete(client, "no-such-adapter")
    assert "model" in str(e.value)
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "ad1"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        _complete(client, "ad1")
    assert "ad1" not in {m.id for m in client.models.list().data}
    # ad0 at start-up, ad1 and the bad one's attempt does not count (it was never read whole)
    assert server.metric("jaxserve_lora_loads_total") == 2
    metrics = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
    assert re.search(
        r'^jaxserve_lora_requests_total\{[^}]*lora_name="ad1"[^}]*\} 1\.0$', metrics, re.M
    )
    tokens = re.search(
        r'^jaxserve_lora_generation_tokens_total\{[^}]*lora_name="ad1"[^}]*\} (\S+)$', metrics, re.M
    )
    assert tokens and float(tokens.group(1)) == chat.usage.completion_tokens
