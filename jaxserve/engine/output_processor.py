"""Output processing: core token ids -> text, stop strings, n-way fan-in, RequestOutput.

Runs where the tokenizer lives (in-process for LLM, the API process for the server). A stop
string found here ends the request in the core too (the caller aborts the returned ids).

NOTE on cost: per step a request costs O(its new tokens) here (ids appended, the incremental
detokenizer's window, stop strings searched in the new text) whatever its output kind; what
differs is the RequestOutput. CUMULATIVE copies the whole text and id list into every one
(O(n) per step, O(n^2) per request); DELTA carries only the new part; FINAL_ONLY (generate())
builds one, when the request finishes, from the lists kept all along, with no copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from jaxserve.core.admission import check_new_request_id
from jaxserve.core.outputs import EngineCoreOutput, TokenLogprobs
from jaxserve.engine.processor import ProcessedPrompt
from jaxserve.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestOutput,
    RequestOutputKind,
)
from jaxserve.sampling_params import SamplingParams
from jaxserve.tokenizer import IncrementalDetokenizer


@dataclass
class _Completion:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # DELTA only: what arrived since the last RequestOutput of this request
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    changed: bool = False


@dataclass
class _RequestState:
    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    # core request id -> its completion
    completions: dict[str, _Completion]
    arrival_time: float
    # what each of its RequestOutputs carries (and whether one is built before the end)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    # with params.prompt_logprobs: None for the first prompt token, then one dict per token
    prompt_logprobs: PromptLogprobs | None = None
    # DELTA: prompt_logprobs arrived and is not in a RequestOutput yet
    prompt_logprobs_pending: bool = False


@dataclass
class ProcessedOutputs:
    # one RequestOutput per user request that changed this step (FINAL_ONLY: that finished)
    request_outputs: list[RequestOutput]
    # core request id -> stop string: requests a stop string ended (abort them in the core)
    stopped_by_string: dict[str, str]


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}
        # core request id -> user request id
        self._parent: dict[str, str] = {}

    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        core_ids: list[str],
        *,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
    ) -> None:
        check_new_request_id(request_id, self._states)
        completions = {}
        for i, core_id in enumerate(core_ids):
            detok = IncrementalDetokenizer(
                self.tokenizer,
                prompt.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
                final_only=output_kind is RequestOutputKind.FINAL_ONLY,
            )
            completions[core_id] = _Completion(
                index=i,
                detokenizer=detok,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            self._parent[core_id] = request_id
        self._states[request_id] = _RequestState(
            request_id,
            prompt,
            params,
            completions,
            arrival_time=time.monotonic(),
            output_kind=output_kind,
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    def abort_request(self, request_id: str) -> list[str]:
        """Forgets a user request; returns its unfinished core ids (to abort in the core)."""
        state = self._states.pop(request_id, None)
        if state is None:
            return []
        for core_id in state.completions:
            self._parent.pop(core_id, None)
        return [cid for cid, c in state.completions.items() if c.finish_reason is None]

    def _position(self, e: TokenLogprobs) -> dict[int, Logprob]:
        """One position's dict: its top-N plus its own token, with their texts."""
        pos = {tid: Logprob(lp, rank=r + 1) for r, (tid, lp) in enumerate(e.top)}
        pos[e.token_id] = Logprob(e.logprob, rank=e.rank)
        for tid, lp in pos.items():  # (no tokenizer: decoded_token stays None)
            lp.decoded_token = None if self.tokenizer is None else self.tokenizer.decode([tid])
        return pos

    def _add_logprobs(self, comp: _Completion, entries: list[TokenLogprobs], delta: bool) -> None:
        assert comp.logprobs is not None and comp.cumulative_logprob is not None
        for e in entries:
            pos = self._position(e)
            comp.logprobs.append(pos)
            if delta:
                comp.delta_logprobs.append(pos)
            comp.cumulative_logprob += e.logprob

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        changed: dict[str, _RequestState] = {}
        stopped: dict[str, str] = {}
        now = time.monotonic()
        for out in outputs:
            request_id = self._parent.get(out.request_id)
            if request_id is None:
                continue  # aborted by the user while this step ran
            state = self._states[request_id]
            comp = state.completions[out.request_id]
            if comp.finish_reason is not None:
                continue
            if state.first_token_time is None and out.new_token_ids:
                state.first_token_time = now
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            delta = state.output_kind is RequestOutputKind.DELTA
            comp.token_ids.extend(out.new_token_ids)
            if delta:
                comp.delta_token_ids.extend(out.new_token_ids)
            comp.changed = True
            if out.new_logprobs and comp.logprobs is not None:
                self._add_logprobs(comp, out.new_logprobs, delta)
            if out.prompt_logprobs is not None and state.prompt_logprobs is None:
                # (the first completion's; its siblings compute the same prompt)
                state.prompt_logprobs = [None, *map(self._position, out.prompt_logprobs)]
                state.prompt_logprobs_pending = True
            detok = comp.detokenizer
            # (the detokenizer keeps the whole text too; a delta is only kept for DELTA)
            new_text = detok.update(out.new_token_ids)
            if detok.finished:  # a stop string matched
                comp.finish_reason, comp.stop_reason = "stop", detok.stop_reason
                if out.finish_reason is None:
                    stopped[out.request_id] = str(detok.stop_reason)
            elif out.finish_reason is not None:
                new_text += detok.flush()
                comp.finish_reason = out.finish_reason.value
                comp.stop_reason = out.stop_reason
            if delta:
                comp.delta_text += new_text
            if state.output_kind is not RequestOutputKind.FINAL_ONLY or _is_finished(state):
                changed[request_id] = state
        return ProcessedOutputs([self._make_output(s) for s in changed.values()], stopped)

    def _make_output(self, state: _RequestState) -> RequestOutput:
        completions = []
        kind = state.output_kind
        for comp in state.completions.values():
            if kind is RequestOutputKind.DELTA:
                if not comp.changed:
                    continue
                text, token_ids = comp.delta_text, comp.delta_token_ids
                logprobs = comp.delta_logprobs if comp.logprobs is not None else None
            elif kind is RequestOutputKind.FINAL_ONLY:
                # the one output, after which the state is forgotten: its lists, not copies
                text, token_ids = comp.detokenizer.output_text, comp.token_ids
                logprobs = comp.logprobs
            else:
                text, token_ids = comp.detokenizer.output_text, list(comp.token_ids)
                logprobs = comp.logprobs
            completions.append(
                CompletionOutput(
                    index=comp.index,
                    text=text,
                    token_ids=token_ids,
                    cumulative_logprob=comp.cumulative_logprob,
                    logprobs=logprobs,
                    finish_reason=comp.finish_reason,
                    stop_reason=comp.stop_reason,
                )
            )
            comp.delta_text, comp.delta_token_ids, comp.delta_logprobs = "", [], []
            comp.changed = False
        finished = _is_finished(state)
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        if finished:
            metrics["finished_time"] = time.monotonic()
            self.abort_request(state.request_id)
        prompt_logprobs = state.prompt_logprobs
        if kind is RequestOutputKind.DELTA:  # only in the output it arrived with
            prompt_logprobs = prompt_logprobs if state.prompt_logprobs_pending else None
            state.prompt_logprobs_pending = False
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt.prompt,
            prompt_token_ids=state.prompt.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=state.num_cached_tokens,
            metrics=metrics,
            prompt_logprobs=prompt_logprobs,
        )


def _is_finished(state: _RequestState) -> bool:
    return all(c.finish_reason is not None for c in state.completions.values())
