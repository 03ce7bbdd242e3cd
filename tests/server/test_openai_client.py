"""The official openai client against the server: completions, chat, streaming, embeddings."""

from __future__ import annotations

import openai

from tests.server.fake_engine import SCRIPT


async def _client(client) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")),
        api_key="unused",
        max_retries=0,
    )


async def test_openai_completions_chat_stream(client):
    oai = await _client(client)
    async with oai:
        models = await oai.models.list()
        assert [m.id for m in models.data] == ["fake-model"]
        c = await oai.completions.create(model="fake-model", prompt="Hi", max_tokens=4)
        assert c.choices[0].text == SCRIPT[:4]
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
        chat = await oai.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert chat.choices[0].message.content == SCRIPT[:5]
        assert chat.usage.prompt_tokens_details.cached_tokens == 0
        stream = await oai.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
        assert text == SCRIPT[:6] and usage.completion_tokens == 6
        stream = await oai.completions.create(
            model="fake-model", prompt="Hi", max_tokens=3, stream=True
        )
        assert "".join([ch.choices[0].text async for ch in stream]) == SCRIPT[:3]
        emb = await oai.embeddings.create(model="fake-model", input=["ab", "cde"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 3


async def test_openai_errors(client, engine):
    oai = await _client(client)
    async with oai:
        try:
            await oai.completions.create(model="nope", prompt="x")
        except openai.NotFoundError as e:
            assert e.body["code"] == "model_not_found"
        else:
            raise AssertionError("expected 404")
        engine.overloaded = True
        try:
            await oai.completions.create(model="fake-model", prompt="x")
        except openai.RateLimitError:
            pass
        else:
            raise AssertionError("expected 429")
