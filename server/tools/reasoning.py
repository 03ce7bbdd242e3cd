"""`--reasoning-parser`: `<think>...</think>` outputs (Qwen3, DeepSeek-R1 distills) split into
`message.reasoning_content` and `message.content`, whole or streamed.

NOTE on the rules (parse() and the stream share them, so streamed == non-streamed always):
- Reasoning starts when the prompt left a `<think>` open (R1 distills' templates end with
  "<think>\\n": pass starts_in_reasoning=prompt_opens_reasoning(...)) or when the output
  starts, after whitespace, with `<think>`. Otherwise there is no reasoning: the whole output
  is content, unchanged (a model that did not think, or a closed "<think></think>" prompt).
- Reasoning runs to the first `</think>`; without one, the whole rest is reasoning (the
  length cut came first) and content is None. Reasoning is stripped of whitespace at both ends
  and the content after `</think>` at its start ("</think>\\n\\nAnswer" -> "Answer"). Empty ->
  None.
- The stream holds back a tail that may begin `</think>` (and `<think>` at the start) and
  trailing reasoning whitespace, so neither tag ever leaks into content or reasoning.

NOTE on token ids: the tags are matched in the text the detokenizer produced, which gives
their exact position inside a delta. The token ids (ReasoningTags.start_token_id /
end_token_id, found when the tokenizer has the tag as one token) answer the questions asked
before any text exists: does the prompt leave reasoning open (prompt_opens_reasoning), and
where in the output ids does the answer start (reasoning_end_index), which is where
structured output must start constraining ("applied to the answer part only").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.tools.calls import partial_suffix_len

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class ReasoningTags:
    """The tags of one model's reasoning blocks."""

    start: str = THINK_START
    end: str = THINK_END
    # the tag's id when the tokenizer has it as one token (None: it is several tokens)
    start_token_id: int | None = None
    end_token_id: int | None = None


def _single_token_id(tokenizer: Any, tag: str) -> int | None:
    ids = tokenizer.encode(tag, add_special_tokens=False)
    if len(ids) != 1:
        return None
    return int(ids[0])


def reasoning_tags_from_tokenizer(
    tokenizer: Any, start: str = THINK_START, end: str = THINK_END
) -> ReasoningTags:
    """The tags with their token ids when the tokenizer encodes each as one token.

    NOTE: the detokenizer must keep the tags in its text (Qwen3's and R1's are added tokens
    that are not "special", so skip_special_tokens=True keeps them). A tokenizer that marks
    them special would drop them: check_tags_survive_decoding() says so at startup.
    """
    return ReasoningTags(
        start, end, _single_token_id(tokenizer, start), _single_token_id(tokenizer, end)
    )


def check_tags_survive_decoding(tokenizer: Any, tags: ReasoningTags) -> None:
    """Raises ValueError when decoding with skip_special_tokens=True would drop a tag (the
    server would then never see the boundary): refuse --reasoning-parser at startup."""
    for tag, token_id in ((tags.start, tags.start_token_id), (tags.end, tags.end_token_id)):
        if token_id is None:
            continue
        if tokenizer.decode([token_id], skip_special_tokens=True) != tag:
            raise ValueError(
                f"--reasoning-parser: the tokenizer drops {tag!r} (token {token_id}) when "
                "decoding with skip_special_tokens=True"
            )


def prompt_opens_reasoning(
    tags: ReasoningTags,
    *,
    prompt_token_ids: Sequence[int] | None = None,
    prompt_text: str | None = None,
) -> bool:
    """Whether the rendered prompt leaves a `<think>` open (its last start tag comes after its
    last end tag), so the output begins inside the reasoning. By token id when the tags are
    single tokens and ids are given, else by the prompt's text."""
    if (
        prompt_token_ids is not None
        and tags.start_token_id is not None
        and tags.end_token_id is not None
    ):
        ids = list(prompt_token_ids)
        last_start = max((i for i, t in enumerate(ids) if t == tags.start_token_id), default=-1)
        last_end = max((i for i, t in enumerate(ids) if t == tags.end_token_id), default=-1)
        return last_start > last_end
    if prompt_text is None:
        raise ValueError("prompt_opens_reasoning needs the prompt's token ids or its text")
    return prompt_text.rfind(tags.start) > prompt_text.rfind(tags.end)


def reasoning_end_index(
    tags: ReasoningTags, output_token_ids: Sequence[int], *, starts_in_reasoning: bool
) -> int | None:
    """Where the answer begins in the output ids: 0 when there is no reasoning, the index
    after the end tag's token once it is out, None while the model is still reasoning (or
    has produced nothing yet). Needs the end tag as one token (ValueError otherwise).
    Reasoning counts only when the first output token is the start tag (as Qwen3 emits it);
    the text parser also allows whitespace before it, which no tested model writes."""
    if tags.end_token_id is None:
        raise ValueError(f"the reasoning end tag {tags.end!r} is not a single token")
    ids = list(output_token_ids)
    if not starts_in_reasoning:
        if not ids:
            return None
        if ids[0] != tags.start_token_id:
            return 0
    try:
        return ids.index(tags.end_token_id) + 1
    except ValueError:
        return None


@dataclass(frozen=True)
class ParsedReasoning:
    """A whole output, split."""

    # the text between the tags (stripped); None when there was none
    reasoning_content: str | None
    # the answer; None when empty
    content: str | None


@dataclass
class ReasoningDelta:
    """What one feed() / finish() releases ("" for none)."""

    reasoning_content: str = ""
    content: str = ""


class ReasoningParser:
    """Splits `<think>` outputs; one per request (stateless: stream() makes the state)."""

    def __init__(self, tags: ReasoningTags = ReasoningTags()) -> None:
        self.tags = tags

    def parse(self, text: str, *, starts_in_reasoning: bool = False) -> ParsedReasoning:
        if starts_in_reasoning:
            body = text
        else:
            s = text.lstrip()
            if not s.startswith(self.tags.start):
                return ParsedReasoning(None, text or None)
            body = s[len(self.tags.start) :]
        i = body.find(self.tags.end)
        if i < 0:
            return ParsedReasoning(body.strip() or None, None)
        answer = body[i + len(self.tags.end) :].lstrip()
        return ParsedReasoning(body[:i].strip() or None, answer or None)

    def stream(self, *, starts_in_reasoning: bool = False) -> ReasoningStream:
        return ReasoningStream(self.tags, starts_in_reasoning)


# the stream's phases
_UNDECIDED, _REASONING, _ANSWER_START, _ANSWER = range(4)


class ReasoningStream:
    """Incremental split of one choice: feed() each text delta, finish() once at the end."""

    def __init__(self, tags: ReasoningTags, starts_in_reasoning: bool) -> None:
        self.tags = tags
        self._phase = _REASONING if starts_in_reasoning else _UNDECIDED
        self._buf = ""
        # reasoning released so far is empty: leading whitespace is still being dropped
        self._is_reasoning_start = True
        self.reasoning_parts: list[str] = []
        self.content_parts: list[str] = []

    @property
    def is_reasoning_done(self) -> bool:
        """The end tag has been seen (or there was no reasoning): what follows is the answer."""
        return self._phase in (_ANSWER_START, _ANSWER)

    def feed(self, text: str) -> ReasoningDelta:
        self._buf += text
        return self._drain(is_final=False)

    def finish(self) -> ReasoningDelta:
        return self._drain(is_final=True)

    def _drain(self, *, is_final: bool) -> ReasoningDelta:
        out = ReasoningDelta()
        start, end = self.tags.start, self.tags.end
        while True:
            if self._phase == _UNDECIDED:
                s = self._buf.lstrip()
                if s.startswith(start):
                    self._buf, self._phase = s[len(start) :], _REASONING
                    continue
                if not is_final and (not s or start.startswith(s)):
                    return out
                self._phase = _ANSWER  # no reasoning: the text is content, as is
                continue
            if self._phase == _REASONING:
                if self._is_reasoning_start:
                    self._buf = self._buf.lstrip()
                    if not self._buf and not is_final:
                        return out
                i = self._buf.find(end)
                if i >= 0:
                    self._reason(out, self._buf[:i].rstrip())
                    self._buf, self._phase = self._buf[i + len(end) :], _ANSWER_START
                    continue
                if is_final:
                    self._reason(out, self._buf.rstrip())
                    self._buf = ""
                    return out
                cut = len(self._buf) - partial_suffix_len(self._buf, end)
                cut = len(self._buf[:cut].rstrip())
                self._reason(out, self._buf[:cut])
                self._buf = self._buf[cut:]
                return out
            if self._phase == _ANSWER_START:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return out
                self._phase = _ANSWER
            self._answer(out, self._buf)
            self._buf = ""
            return out

    def _reason(self, out: ReasoningDelta, text: str) -> None:
        if text:
            self._is_reasoning_start = False
            out.reasoning_content += text
            self.reasoning_parts.append(text)

    def _answer(self, out: ReasoningDelta, text: str) -> None:
        if text:
            out.content += text
            self.content_parts.append(text)
