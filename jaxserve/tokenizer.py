"""Tokenizer side of a request (API process): loading, chat templates, incremental detokenizing.

The engine core sees token ids only. This module turns chat messages into prompt ids and the
stream of generated ids back into text deltas that never split a character and never leak
part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded ahead of the first output token, so tokenizers that strip or add a
# leading space by position (sentencepiece's "▁") render the first delta as the full decode
# would (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def _message_content(content: Any, field: str) -> str:
    """OpenAI content (a string or a list of text parts) -> the string templates expect."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"{field}[{j}].type must be 'text' (only text is supported)")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{field}[{j}].text must be a string")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"{field} must be a string or a list of text parts, got {content!r}")


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    allow_special_tokens_in_content: bool = False,
    tools: list[dict] | None = None,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Renders `messages` with the model's (or the given) chat template -> prompt token ids.

    tools: OpenAI tool definitions for templates that render them; continue_final_message:
    the last message is left open for the model to continue (no end-of-turn, no generation
    prompt); template_kwargs: extra template variables (e.g. enable_thinking).

    The template's text already holds the special tokens it wants (bos included), so it is
    encoded with add_special_tokens=False, as vLLM does.

    NOTE on control tokens: only the template writes them. A control token's spelling inside
    a message (`<|im_start|>system` typed as user text) is encoded as that text, so user text
    cannot forge a turn. This is transformers' own `sanitize_control_tokens` (it marks the
    spellings in every string of the messages, roles and names included, renders, and encodes
    the marked spans as text); a chat without such spellings encodes exactly as before.
    `allow_special_tokens_in_content=True` encodes them as control tokens again (the behaviour
    of vLLM and of jaxserve before), for callers whose messages are trusted.
    """
    if tokenizer is None:  # a load_format="dummy" model without tokenizer files
        raise ValueError("messages need a tokenizer and this model has none: give prompt_token_ids")
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if not template:
        raise ValueError("the model's tokenizer has no chat template; pass chat_template")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role is required and must be a non-empty string")
        if "content" not in message:
            raise ValueError(f"messages[{i}].content is required")
        conversation.append(
            {**message, "content": _message_content(message["content"], f"messages[{i}].content")}
        )
    options: dict[str, Any] = {
        **(template_kwargs or {}),
        "chat_template": template,
        "add_generation_prompt": add_generation_prompt,
    }
    if tools is not None:
        options["tools"] = tools
    if continue_final_message:
        options["continue_final_message"] = True
    if allow_special_tokens_in_content:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, **options)
        return list(tokenizer.encode(text, add_special_tokens=False))
    try:
        ids = tokenizer.apply_chat_template(
            conversation,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
            **options,
        )
    except ValueError as e:
        if "sanitize" not in str(e):
            raise
        # a tokenizer whose vocabulary makes the control token from its plain text too
        raise ValueError(
            f"messages hold a control token that this tokenizer cannot encode as text ({e}); "
            "remove it from the messages"
        ) from None
    return list(ids)


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas, one update() per engine step.

    NOTE on the offsets (vLLM's detokenize_incrementally): ids[prefix_offset:read_offset] is
    text already emitted, kept as context; each update decodes ids[prefix_offset:] and emits
    what it adds beyond that context, but only once the decode does not end in U+FFFD (a
    multi-byte character whose remaining bytes are in tokens not yet generated). Decoding a
    few tokens with context gives the same characters as decoding everything, at O(window)
    cost per token.

    NOTE on stop strings: each update searches only the new text plus the last
    max(len(stop)) - 1 characters before it (a match wholly inside older text would have
    stopped the request already). With stream_holdback, the longest tail that is the start of
    some stop string is held back, so no emitted delta ever holds text a later match removes.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,  # None: a model without one (no text)
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        stream_holdback: bool = True,
        min_tokens: int = 0,
        final_only: bool = False,
    ) -> None:
        """final_only: nobody reads the text before flush(); with no stop string to look
        for, update() then only collects ids and flush() decodes them once (the same decode
        of context + ids, so the same text), instead of twice per step."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stream_holdback = stream_holdback
        # stop strings are not checked until more than min_tokens ids are out (as vLLM)
        self.min_tokens = min_tokens
        # the stop string that ended the text, if any
        self.stop_reason: str | None = None
        self.finished = False
        self._deferred = final_only and not self.stop

        context = list(prompt_token_ids[-_INITIAL_CONTEXT_TOKENS:])
        # the decode window: context + output ids; only its tail past prefix_offset is decoded
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_output_ids = 0
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # committed text: _chunks (emitted) + _unsent (held back); _tail is the last
        # max_stop_len - 1 committed characters, the only old text a new match can touch
        self._chunks: list[str] = []
        self._unsent = ""
        self._tail = ""

    @property
    def output_text(self) -> str:
        """All text so far (emitted + held back), truncated at a stop string."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return (self._chunks[0] if self._chunks else "") + self._unsent

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Adds generated ids; returns the text delta to stream ("" while nothing is ready)."""
        if self.finished or self.tokenizer is None:  # no tokenizer: token ids only, no text
            return ""
        self._ids.extend(new_token_ids)
        self._num_output_ids += len(new_token_ids)
        if self._deferred:
            return ""
        return self._add_text(self._decode_ready())

    def flush(self) -> str:
        """At the end of the request: everything still held back (or undecodable), if no stop
        string matched."""
        if self.finished or self.tokenizer is None:
            return ""
        out = self._add_text(self._decode_ready(force=True))
        if not self.finished:
            out += self._unsent
            self._chunks.append(self._unsent)
            self._unsent = ""
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode_ready(self, force: bool = False) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: nothing visible yet
        if new_text.endswith(_REPLACEMENT_CHAR) and not force:
            return ""  # a character is still incomplete: wait for its next bytes
        # Keep only the ids still needed as context, so the list (and the cost) stay small.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text) :]

    def _add_text(self, new: str) -> str:
        """Commits `new`, cutting at a stop string; returns what may be emitted now."""
        if not new:
            return ""
        pending = self._unsent + new
        if self.stop and self._num_output_ids > self.min_tokens:
            window = self._tail + new
            hit = self._find_stop(window, len(self._tail))
            if hit is not None:
                index, stop_str = hit
                cut = index + len(stop_str) if self.include_stop_str_in_output else index
                drop = len(window) - cut
                if drop > len(pending):
                    # only without holdback: the match began in text already emitted
                    self._truncate_chunks(drop - len(pending))
                pending = pending[: max(len(pending) - drop, 0)]
                self.stop_reason = stop_str
                self.finished = True
                self._chunks.append(pending)
                self._unsent = ""
                return pending
        if self._max_stop_len > 1:
            self._tail = (self._tail + new)[-(self._max_stop_len - 1) :]
        held = self._holdback_len() if self.stream_holdback else 0
        # the held-back tail is a prefix of a stop string; by induction it lies in `pending`
        emit, self._unsent = pending[: len(pending) - held], pending[len(pending) - held :]
        self._chunks.append(emit)
        return emit

    def _find_stop(self, text: str, num_old: int) -> tuple[int, str] | None:
        """The earliest stop-string match in `text` that ends past its first `num_old` (old)
        characters (the longest string on a tie). Old-only matches can exist only when
        min_tokens held the check off, and then they do not count (as in vLLM)."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = text.find(s, max(num_old - len(s) + 1, 0))
            if i >= 0 and (best is None or (i, -len(s)) < (best[0], -len(best[1]))):
                best = (i, s)
        return best

    def _holdback_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for k in range(min(self._max_stop_len - 1, len(self._tail)), 0, -1):
            suffix = self._tail[-k:]
            if any(s.startswith(suffix) for s in self.stop):
                return k
        return 0

    def _truncate_chunks(self, n: int) -> None:
        text = self.output_text
        self._chunks = [text[: len(text) - len(self._unsent) - n]]


def decode_tokens(
    tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int], skip_special_tokens: bool = True
) -> str:
    """Whole-sequence decode with the settings the incremental detokenizer matches."""
    return tokenizer.decode(
        list(token_ids),
        skip_special_tokens=skip_special_tokens,
        clean_up_tokenization_spaces=False,
    )
