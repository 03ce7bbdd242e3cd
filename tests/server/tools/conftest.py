"""The default model's tokenizer and its llguidance LLTokenizer, built once per session
(building the LLTokenizer takes seconds)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from jaxserve.model.loader import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def ll_tokenizer(tokenizer):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer)
