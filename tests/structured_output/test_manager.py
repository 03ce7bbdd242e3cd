"""StructuredOutputManager without a model: walk each matcher by picking tokens from its mask.

A walk is what any sampler under the mask can do: at each step take an allowed token (a
random one, the lowest id as a stand-in for a greedy model, or whitespace whenever allowed as
the worst case for JSON mode), until eos. Whatever the walk, the text must satisfy the
constraint and end within the bound the schema implies.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve.structured_output.grammar import lark_json
from jaxserve.structured_output.manager import StructuredOutputManager
from jaxserve.structured_output.params import StructuredOutputsParams
from tests.structured_output.schemas import json_schemas, max_json_bytes

# The model's vocab is wider than the tokenizer's (49152) and not a multiple of 32, as padded
# embeddings are: the padding ids must never be allowed.
PADDED_VOCAB = 49152 + 45
Pick = Callable[[np.ndarray], int]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from jaxserve.model.loader import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def manager(hf_tokenizer) -> StructuredOutputManager:
    return StructuredOutputManager(
        hf_tokenizer, PADDED_VOCAB, eos_token_id=hf_tokenizer.eos_token_id
    )


class Walker:
    """Drives one request of a manager, checking every mask it fills on the way."""

    def __init__(self, manager: StructuredOutputManager, tokenizer, req_id: str) -> None:
        self.manager, self.tokenizer, self.req_id = manager, tokenizer, req_id
        self.out = np.empty((2, manager.bitmask_width), np.uint32)

    def allowed(self) -> np.ndarray:
        # the request sits in row 1 of 2; row 0 is an unconstrained batch-mate
        has_mask = self.manager.fill_bitmask([None, self.req_id], self.out)
        assert has_mask.tolist() == [False, True]
        assert (self.out[0] == 0xFFFFFFFF).all()
        bits = np.unpackbits(self.out[1].view(np.uint8), bitorder="little")
        assert not bits[len(self.tokenizer) :].any(), "a padding id past the tokenizer's vocab"
        ids = np.nonzero(bits)[0]
        assert ids.size, "a mask that allows nothing"
        return ids

    def walk(self, pick: Pick, max_tokens: int) -> list[int]:
        """Tokens taken until eos (eos excluded); fails past max_tokens."""
        tokens: list[int] = []
        for _ in range(max_tokens + 1):
            token = pick(self.allowed())
            assert self.manager.accept_tokens(self.req_id, [token]), self.manager.error(self.req_id)
            if token == self.manager.eos_token_id:
                return tokens
            tokens.append(token)
        raise AssertionError(f"no eos within {max_tokens} tokens: {self.text(tokens)!r}")

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)


def random_pick(rng: np.random.Generator) -> Pick:
    return lambda ids: int(rng.choice(ids))


def lowest_pick(ids: np.ndarray) -> int:
    return int(ids[0])


@functools.cache
def whitespace_lengths(tokenizer) -> np.ndarray:
    """i32[len(tokenizer)]: the length of each all-whitespace token, 0 for the others."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    texts = [tokenizer.convert_tokens_to_string([t]) for t in vocab]
    return np.array([len(t) if t and not t.strip() else 0 for t in texts])


def whitespace_pick(tokenizer, rng: np.random.Generator) -> Pick:
    """The adversary of JSON mode: the longest all-whitespace token whenever one is allowed."""
    space_len = whitespace_lengths(tokenizer)

    def pick(ids: np.ndarray) -> int:
        lens = space_len[ids[ids < len(space_len)]]
        if lens.any():
            return int(ids[np.argmax(lens)])
        return int(rng.choice(ids))

    return pick


def run(manager, tokenizer, params, pick: Pick, max_tokens: int, req_id: str = "r") -> str:
    manager.add_request(req_id, params)
    try:
        walker = Walker(manager, tokenizer, req_id)
        text = walker.text(walker.walk(pick, max_tokens))
        assert manager.is_finished(req_id)
        return text
    finally:
        manager.remove(req_id)
        assert req_id not in manager


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=json_schemas(), seed=st.integers(0, 2**32 - 1))
def test_json_schema_walks_validate_and_end_within_the_bound(
    manager, hf_tokenizer, schema, seed
) -> None:
    rng = np.random.default_rng(seed)
    bound = max_json_bytes(schema)  # a token is at least one byte
    params = StructuredOutputsParams(json=schema)
    for pick in (random_pick(rng), lowest_pick, whitespace_pick(hf_tokenizer, rng)):
        text = run(manager, hf_tokenizer, params, pick, bound)
        assert len(text.encode()) <= bound, text
        jsonschema.validate(json.loads(text), schema)
        assert longest_whitespace_run(text) <= 1, text


def longest_whitespace_run(text: str) -> int:
    """The longest run of whitespace between JSON tokens (outside strings)."""
    longest = run_len = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            in_string = escaped or ch != '"'
            escaped = not escaped and ch == "\\"
            continue
        in_string = ch == '"'
        run_len = run_len + 1 if ch.isspace() else 0
        longest = max(longest, run_len)
    return longest


def whitespace_tokens_taken(manager, tokenizer, params, limit: int) -> str:
    """After "{", take the longest all-whitespace token while one is allowed (up to limit)."""
    pick = whitespace_pick(tokenizer, np.random.default_rng(0))
    manager.add_request("ws", params)
    try:
        walker = Walker(manager, tokenizer, "ws")
        (brace,) = tokenizer.encode("{", add_special_tokens=False)
        assert brace in walker.allowed()
        assert manager.accept_tokens("ws", [brace])
        taken: list[int] = []
        while len(taken) < limit:
            token = pick(walker.allowed())
            if walker.text([token]).strip():
                break  # no whitespace-only token was allowed
            taken.append(token)
            assert manager.accept_tokens("ws", [token])
        return walker.text(taken)
    finally:
        manager.remove("ws")


def test_whitespace_stays_bounded_even_for_any_json_object(manager, hf_tokenizer) -> None:
    # {"type": "object"} bounds nothing it holds, but its whitespace still is: after "{" the
    # adversary gets one space, then must write a key or close the object
    bounded = StructuredOutputsParams(json_object=True)
    assert whitespace_tokens_taken(manager, hf_tokenizer, bounded, 30) == " "
    none = StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    assert whitespace_tokens_taken(manager, hf_tokenizer, none, 30) == ""
    # the same adversary never stops once whitespace is unbounded (llguidance's and vLLM's
    # default): the bound is what ends it
    loose = StructuredOutputsParams(json_object=True, whitespace_pattern=r"[ \n]*")
    text = whitespace_tokens_taken(manager, hf_tokenizer, loose, 30)
    assert len(text) > 30 and not text.strip()


def test_json_embedded_in_a_lark_grammar_is_bounded_too(manager, hf_tokenizer) -> None:
    # what a forced tool call looks like: a tag, then the arguments' JSON, then a tag
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"],
        "additionalProperties": False,
    }
    grammar = f'start: "<tool_call>" args "</tool_call>"\nargs: {lark_json(schema)}'
    params = StructuredOutputsParams(grammar=grammar)
    rng = np.random.default_rng(3)
    text = run(manager, hf_tokenizer, params, whitespace_pick(hf_tokenizer, rng), 200)
    inner = text.removeprefix("<tool_call>").removesuffix("</tool_call>")
    jsonschema.validate(json.loads(inner), schema)
    assert longest_whitespace_run(inner) <= 1, text
    # without it, llguidance's %json lets whitespace run on
    loose = StructuredOutputsParams(grammar=grammar.replace(lark_json(schema), "%json {}"))
    manager.add_request("loose", loose)
    walker = Walker(manager, hf_tokenizer, "loose")
    for token in hf_tokenizer.encode("<tool_call>{", add_special_tokens=False):
        assert manager.accept_tokens("loose", [token])
    (spaces,) = hf_tokenizer.encode("    ", add_special_tokens=False)
    for _ in range(20):
        assert spaces in walker.allowed()
        assert manager.accept_tokens("loose", [spaces])
    manager.remove("loose")


def test_disable_any_whitespace_gives_compact_json(manager, hf_tokenizer) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"const": 1}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    params = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    pick = whitespace_pick(hf_tokenizer, np.random.default_rng(1))
    text = run(manager, hf_tokenizer, params, pick, 40)
    assert re.fullmatch(r'\{"a":[0-9],"b":1\}', text), text


REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{0,6}( [A-Z][a-z]{0,6}){0,2}",
    r"\d{4}-\d{2}-\d{2}",
    r"(0|[1-9][0-9]{0,3})\.[0-9]{1,2}",
    r"[a-z_]{1,10}\(\)",
]


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_walks_match(manager, hf_tokenizer, regex) -> None:
    params = StructuredOutputsParams(regex=regex)
    rng = np.random.default_rng(len(regex))
    for pick in [random_pick(rng)] * 4 + [lowest_pick]:
        text = run(manager, hf_tokenizer, params, pick, 64)
        assert re.fullmatch(regex, text), text


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    choices=st.lists(
        # any assigned printable text (what a vocab cannot spell is refused: test below)
        st.text(st.characters(exclude_categories=("Cs", "Cn", "Co", "Cc")), min_size=1, max_size=8),
        min_size=1,
        max_size=6,
        unique=True,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_choice_walks_give_a_member(manager, hf_tokenizer, choices, seed) -> None:
    rng = np.random.default_rng(seed)
    params = StructuredOutputsParams(choice=choices)
    bound = max(len(c.encode()) for c in choices)
    for pick in (random_pick(rng), lowest_pick):
        assert run(manager, hf_tokenizer, params, pick, bound) in choices


@pytest.mark.parametrize(("choices", "index"), [(["\x16"], 0), (["ok", "\U00040000"], 1)])
def test_a_choice_the_vocab_cannot_spell_is_refused(manager, choices, index) -> None:
    field = f"structured_outputs.choice[{index}]"
    with pytest.raises(ValueError, match=re.escape(field) + " holds characters"):
        manager.add_request("unspellable", StructuredOutputsParams(choice=choices))
    assert "unspellable" not in manager


def test_a_single_choice_is_forced_then_eos_alone(manager, hf_tokenizer) -> None:
    manager.add_request("z", StructuredOutputsParams(choice=["zebra-42"]))
    walker = Walker(manager, hf_tokenizer, "z")
    tokens = []
    while not manager.is_finished("z"):
        ids = walker.allowed()
        assert manager.eos_token_id not in ids  # not accepting before the whole string
        tokens.append(int(ids[0]))
        assert manager.accept_tokens("z", tokens[-1:])
    assert walker.text(tokens) == "zebra-42"
    assert walker.allowed().tolist() == [manager.eos_token_id]  # forced eos
    assert manager.accept_tokens("z", [manager.eos_token_id])
    assert manager.is_finished("z")
    manager.remove("z")


def test_eos_is_allowed_exactly_when_the_grammar_accepts(manager, hf_tokenizer) -> None:
    manager.add_request("ab", StructuredOutputsParams(regex="a|ab"))
    walker = Walker(manager, hf_tokenizer, "ab")
    (a,) = hf_tokenizer.encode("a", add_special_tokens=False)
    assert manager.eos_token_id not in walker.allowed()
    assert manager.accept_tokens("ab", [a])
    ids = walker.allowed()
    assert manager.eos_token_id in ids and len(ids) > 1  # accepting, "b" may still follow
    assert not manager.is_finished("ab")
    manager.remove("ab")


def test_the_eos_override_is_the_id_the_mask_forces(hf_tokenizer) -> None:
    # a model whose eos is not the tokenizer's: the forced token is the model's
    im_start = hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
    manager = StructuredOutputManager(hf_tokenizer, 49152, eos_token_id=im_start)
    manager.add_request("y", StructuredOutputsParams(choice=["y"]))
    walker = Walker(manager, hf_tokenizer, "y")
    (y,) = hf_tokenizer.encode("y", add_special_tokens=False)
    assert walker.allowed().tolist() == [y]
    assert manager.accept_tokens("y", [y])
    assert walker.allowed().tolist() == [im_start]


def test_reset_replays_to_the_same_mask(manager, hf_tokenizer) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "n": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 99},
                "maxItems": 3,
            },
        },
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    params = StructuredOutputsParams(json=schema)
    rng = np.random.default_rng(7)
    manager.add_request("orig", params)
    walker = Walker(manager, hf_tokenizer, "orig")
    out = np.empty((2, manager.bitmask_width), np.uint32)
    tokens: list[int] = []
    for k in range(8):
        tokens.append(random_pick(rng)(walker.allowed()))
        assert manager.accept_tokens("orig", tokens[-1:])
        # a preempted twin, at any point: rebuilt from the grammar's start by replay
        manager.add_request("twin", params)
        assert manager.accept_tokens("twin", [tokens[0]])  # some state to throw away
        assert manager.reset("twin", tokens)
        manager.fill_bitmask(["orig", "twin"], out)
        np.testing.assert_array_equal(out[0], out[1], err_msg=f"after {k + 1} tokens")
        manager.remove("twin")
    # a reset also clears an error, and replaying an illegal token reports it
    (bad,) = hf_tokenizer.encode("}", add_special_tokens=False)
    assert not manager.accept_tokens("orig", [bad, bad])
    assert manager.error("orig") and not manager.is_finished("orig")
    assert walker.allowed().tolist() == [manager.eos_token_id]  # an errored row can only end
    assert manager.reset("orig", tokens) and manager.error("orig") is None
    assert not manager.reset("orig", [*tokens, bad, bad])
    manager.remove("orig")


def test_out_of_vocab_tokens_fail_the_request_not_the_manager(manager, hf_tokenizer) -> None:
    manager.add_request("oov", StructuredOutputsParams(json_object=True))
    assert not manager.accept_tokens("oov", [PADDED_VOCAB])
    assert "outside the vocab" in manager.error("oov")
    assert Walker(manager, hf_tokenizer, "oov").allowed().tolist() == [manager.eos_token_id]
    manager.remove("oov")
    manager.add_request("pad", StructuredOutputsParams(json_object=True))
    assert not manager.accept_tokens("pad", [PADDED_VOCAB - 1])  # a padding id: never legal
    manager.remove("pad")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (dict(grammar="start: foo"), "structured_outputs.grammar"),
        (dict(grammar='start: "a" "b'), "structured_outputs.grammar"),
        (dict(grammar="root ::= [a-"), "structured_outputs.grammar"),
        # token-level references: only a check with the tokenizer sees these
        (dict(grammar="start: <|no-such-token|>"), "structured_outputs.grammar"),
        (dict(grammar="start: <[99999]>"), "structured_outputs.grammar"),
        (dict(regex="a(b"), "structured_outputs.regex"),
        (dict(regex="[z-a]"), "structured_outputs.regex"),
        (dict(json={"type": "foo"}), "structured_outputs.json"),
        (dict(json={"properties": 3}), "structured_outputs.json"),
        (dict(json={"type": "string", "maxLength": -1}), "structured_outputs.json"),
        (dict(json={"type": "array", "uniqueItems": True}), "structured_outputs.json"),
        (dict(json={"type": "string", "format": "no-such-format"}), "structured_outputs.json"),
        (dict(json="[1, 2]"), "structured_outputs.json"),
        (dict(json="{not json"), "structured_outputs.json"),
        (dict(json_object=True, whitespace_pattern="("), "structured_outputs.whitespace_pattern"),
    ],
)
def test_what_cannot_compile_is_a_value_error_naming_the_field(manager, params, field) -> None:
    with pytest.raises(ValueError) as info:
        manager.add_request("bad", StructuredOutputsParams(**params))
    assert str(info.value).startswith(field + " "), str(info.value)
    assert info.value.field == field
    assert "bad" not in manager and manager.num_requests == 0


def test_unconstrained_rows_are_all_ones_and_rows_fill_as_one_batch(manager) -> None:
    params = [
        StructuredOutputsParams(choice=["red", "green"]),
        StructuredOutputsParams(regex=r"[0-9]{2}"),
        StructuredOutputsParams(json_object=True),
    ]
    for i, p in enumerate(params):
        manager.add_request(f"c{i}", p)
    alone = np.empty((len(params), manager.bitmask_width), np.uint32)
    for i in range(len(params)):
        manager.fill_bitmask([f"c{i}"], alone[i : i + 1])
    rows = ["c2", None, "never-added", "c0", "c1"]
    out = np.zeros((7, manager.bitmask_width), np.uint32)
    fills, filled = manager.stats.num_fills, manager.stats.num_rows
    has_mask = manager.fill_bitmask(rows, out)
    assert (manager.stats.num_fills, manager.stats.num_rows) == (fills + 1, filled + 3)
    assert has_mask.tolist() == [True, False, False, True, True, False, False]
    assert (out[~has_mask] == 0xFFFFFFFF).all()
    np.testing.assert_array_equal(out[[3, 4, 0]], alone)
    for i in range(len(params)):
        manager.remove(f"c{i}")
    assert manager.num_requests == 0
    with pytest.raises(ValueError, match="u32"):
        manager.fill_bitmask([None], np.zeros((1, manager.bitmask_width), np.int32))


def test_compiled_grammars_are_cached_and_shared_safely(manager, hf_tokenizer) -> None:
    params = StructuredOutputsParams(regex=r"[a-c]{2}")
    before = manager.num_cached_grammars
    manager.compile(params)
    manager.compile(StructuredOutputsParams(regex=r"[a-c]{2}"))
    assert manager.num_cached_grammars == min(before + 1, manager.cache_size)
    # two requests of one grammar advance independently
    manager.add_request("p", params)
    manager.add_request("q", params)
    (a,) = hf_tokenizer.encode("a", add_special_tokens=False)
    assert manager.accept_tokens("p", [a])
    out = np.empty((2, manager.bitmask_width), np.uint32)
    manager.fill_bitmask(["p", "q"], out)
    assert not np.array_equal(out[0], out[1])
    with pytest.raises(ValueError, match="already"):
        manager.add_request("p", params)
    manager.remove("p")
    manager.remove("q")


def test_the_cache_evicts_the_least_recently_used_grammar(manager, hf_tokenizer) -> None:
    # an LLTokenizer is taken as it is (no second 0.5 s build)
    small = StructuredOutputManager(manager.ll_tokenizer, PADDED_VOCAB, cache_size=2)
    grammars = [StructuredOutputsParams(regex=f"x{i}") for i in range(3)]
    small.add_request("old", grammars[0])
    for params in grammars[1:]:
        small.compile(params)
    assert small.num_cached_grammars == 2
    # a request outlives its grammar's cache entry: it holds its own start state for reset
    (x,) = hf_tokenizer.encode("x", add_special_tokens=False)
    assert small.accept_tokens("old", [x]) and small.reset("old", [x])
    assert not small.is_finished("old")
    small.remove("old")
    with pytest.raises(ValueError, match="vocab_size=49152 but"):
        StructuredOutputManager(manager.ll_tokenizer, 49152)


def test_fills_on_one_thread_while_another_accepts(manager, hf_tokenizer) -> None:
    # the engine's pattern: a host thread fills while the scheduler thread accepts tokens
    params = StructuredOutputsParams(regex=r"[a-z]{1,200}")
    ids = hf_tokenizer.encode("abcdefghij" * 5, add_special_tokens=False)
    manager.add_request("t", params)
    stop = threading.Event()
    errors: list[BaseException] = []

    def filler() -> None:
        out = np.empty((4, manager.bitmask_width), np.uint32)
        try:
            while not stop.is_set():
                manager.fill_bitmask(["t", None, "u-not-yet"], out)
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    thread = threading.Thread(target=filler)
    thread.start()
    try:
        for t in ids:
            assert manager.accept_tokens("t", [t])
    finally:
        stop.set()
        thread.join()
    assert not errors
    manager.add_request("u", params)
    assert manager.reset("u", ids)
    out = np.empty((2, manager.bitmask_width), np.uint32)
    manager.fill_bitmask(["t", "u"], out)
    np.testing.assert_array_equal(out[0], out[1])
    # a request named in two rows gets the same mask in both
    out = np.empty((3, manager.bitmask_width), np.uint32)
    manager.fill_bitmask(["t", None, "t"], out)
    np.testing.assert_array_equal(out[0], out[2])
    manager.remove("t")
    manager.remove("u")
