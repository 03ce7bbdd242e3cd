"""StructuredOutputsParams -> an llguidance grammar (TopLevelGrammar JSON text), validated.

Cheap enough for the API process to call at request validation (about a millisecond for a
mid-size schema), so a schema or grammar that cannot compile is a 400 naming the field before
the request reaches the engine or takes a KV block. The engine core compiles the same text into
matchers (manager.py). No jax here.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from jaxserve.structured_output.params import (
    FIELD_PREFIX,
    StructuredOutputsError,
    StructuredOutputsParams,
    canonical_schema,
)

# NOTE: JSON whitespace is bounded by default. llguidance's own default (whitespace_flexible)
# allows any run of spaces, tabs and newlines between JSON tokens, which is how greedy JSON
# mode loops on "\n\n\n..." until max_tokens in other engines (vllm#38696). At most one space
# between tokens keeps the `{"a": 1, "b": [2]}` style models are trained on and makes every
# whitespace run one character long.
BOUNDED_JSON_WHITESPACE = r"[ ]?"
# "Any JSON object" (json_object / OpenAI's response_format json_object).
ANY_JSON_OBJECT_SCHEMA = '{"type":"object"}'
# Longest llguidance message kept in an error (its parser errors dump whole parser states).
MAX_ERROR_CHARS = 1000


def _error(name: str, why: str) -> StructuredOutputsError:
    why = why.strip()
    if len(why) > MAX_ERROR_CHARS:
        why = why[:MAX_ERROR_CHARS] + " ..."
    return StructuredOutputsError(FIELD_PREFIX + name, why)


def json_compile_options(params: StructuredOutputsParams) -> dict[str, Any]:
    """llguidance JsonCompileOptions for a json / json_object request (the whitespace rule).

    They are passed as llguidance `defaults`, so a schema's own "x-guidance" options (the
    documented llguidance extension) still take precedence over them.
    """
    if params.disable_any_whitespace:
        # no whitespace at all; separators stay the bare "," and ":"
        return {"whitespace_flexible": False}
    return {"whitespace_pattern": params.whitespace_pattern or BOUNDED_JSON_WHITESPACE}


def _choice_lark(choices: tuple[str, ...]) -> str:
    # A Lark string literal takes JSON string escapes, as llguidance.grammar_from("choice")
    # writes them; ASCII-escaped, since a raw DEL (0x7f) in a literal is a Lark lexer error.
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def lark_json(schema: dict[str, Any] | str, *, disable_any_whitespace: bool = False) -> str:
    """A `%json {...}` term for a Lark grammar, with the whitespace rule of json requests.

    llguidance's %json uses its unbounded default whitespace unless the schema says
    otherwise, so a grammar that embeds JSON (a forced tool call) takes its JSON from here.
    StructuredOutputsError naming structured_outputs.json for a schema that is not an object.
    """
    schema = json.loads(canonical_schema(schema))
    params = StructuredOutputsParams(
        json_object=True, disable_any_whitespace=disable_any_whitespace
    )
    guidance = {**json_compile_options(params), **schema.get("x-guidance", {})}
    return "%json " + json.dumps({**schema, "x-guidance": guidance})


def grammar_text(params: StructuredOutputsParams) -> str:
    """The TopLevelGrammar JSON for params, unvalidated (compile_grammar validates)."""
    kind = params.kind
    try:
        if kind == "json" or kind == "json_object":
            schema = params.json if kind == "json" else ANY_JSON_OBJECT_SCHEMA
            return llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults=json_compile_options(params)
            )
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark(_choice_lark(params.choice))
        # "grammar" also converts llama.cpp's GBNF (what vLLM users send as guided_grammar)
        return llguidance.grammar_from("grammar", params.grammar)
    except ValueError as e:
        raise _error(kind, str(e)) from None


def compile_grammar(
    params: StructuredOutputsParams, ll_tokenizer: llguidance.LLTokenizer | None = None
) -> str:
    """The validated TopLevelGrammar JSON for params; StructuredOutputsError if it can't compile.

    Without a tokenizer the grammar is checked on its own (schema keywords, regex syntax, Lark
    rules); with one, token-level references (special tokens in a Lark grammar) are checked too.
    """
    if params.whitespace_pattern is not None:
        # checked on its own first, so its error names it rather than the schema
        ws_grammar = llguidance.LLMatcher.grammar_from_regex(params.whitespace_pattern)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(ws_grammar)
        if is_error:
            raise _error("whitespace_pattern", f"is not a valid regex: {messages[0]}")
    if params.choice is not None and ll_tokenizer is not None:
        _check_producible(params.choice, ll_tokenizer)
    grammar = grammar_text(params)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
    if is_error:
        raise _error(params.kind, f"cannot be compiled: {messages[0]}")
    return grammar


def _check_producible(choices: tuple[str, ...], ll_tokenizer: llguidance.LLTokenizer) -> None:
    # A choice the vocab cannot spell (SmolLM2's has no token for bytes such as 0x16 or 0xF1)
    # would leave its matcher with no legal token; refuse it up front. Tokenizing and decoding
    # back is a proof that a spelling exists (it need not be the tokenizer's canonical one).
    for i, choice in enumerate(choices):
        spelled = ll_tokenizer.decode_bytes(ll_tokenizer.tokenize_str(choice))
        if spelled != choice.encode():
            raise _error(
                f"choice[{i}]", f"holds characters the model's vocab cannot spell: {choice!r}"
            )


def new_matcher(
    grammar: str, ll_tokenizer: llguidance.LLTokenizer, kind: str
) -> llguidance.LLMatcher:
    """A matcher at the grammar's start; StructuredOutputsError (naming `kind`) if it errs."""
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise _error(kind, f"cannot be compiled: {matcher.get_error()}")
    return matcher


def build_ll_tokenizer(
    tokenizer: Any, vocab_size: int | None = None, eos_token_id: int | None = None
) -> llguidance.LLTokenizer:
    """The llguidance tokenizer for an HF fast tokenizer (about 0.5 s: build it once).

    vocab_size: the model's vocab (its logits width); ids past the tokenizer's own vocab are
    padding rows of the embedding, and llguidance never allows them (their mask bits are 0).
    eos_token_id: the id that ends the request in the engine (the model's eos); llguidance
    allows it exactly when the grammar accepts, and only it once nothing else may follow.
    """
    if isinstance(tokenizer, llguidance.LLTokenizer):
        if vocab_size is not None and tokenizer.vocab_size != vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} but the LLTokenizer was built for {tokenizer.vocab_size}"
            )
        return tokenizer
    # deferred: llguidance.hf imports transformers, which request validation never needs
    from llguidance.hf import from_tokenizer

    try:
        return from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_id)
    except ValueError as e:
        raise ValueError(
            f"cannot build the llguidance tokenizer (vocab_size={vocab_size}): {e}"
        ) from e
