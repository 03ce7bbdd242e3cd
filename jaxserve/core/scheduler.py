"""Scheduler: the token-budget continuous-batching loop of the engine core (vLLM V1 semantics).

schedule() picks this step's requests and token counts -> SchedulerOutput; the runner computes
them; update_from_output() appends the sampled tokens, finds finished requests and frees their
blocks -> EngineCoreOutputs. Plain host Python: per-step cost is O(scheduled requests + new blocks).
The requests themselves (their queues, and how one leaves) are RequestQueues' (request_queues.py).
"""

from __future__ import annotations

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.core.outputs import (
    EngineCoreOutput,
    EngineCoreOutputs,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
)
from jaxserve.core.request_queues import RequestQueues
from jaxserve.core.waiting_queue import WaitingQueue
from jaxserve.request import Request, RequestStatus


class Scheduler(RequestQueues):
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        *,
        max_loras: int | None = None,
    ) -> None:
        """max_loras: LoRA device slots (None: LoRA off)."""
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.max_model_len = scheduler_config.max_model_len
        self.block_size = cache_config.block_size
        kv_cache_manager = KVCacheManager(
            num_blocks=num_blocks,
            block_size=cache_config.block_size,
            enable_caching=cache_config.enable_prefix_caching,
            max_model_len=scheduler_config.max_model_len,
        )
        policy = WaitingQueue(scheduler_config.scheduling_policy)
        super().__init__(kv_cache_manager, policy, max_loras)
        # cumulative number of preemptions
        self.num_preemptions = 0

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block hash; refused (False) while a request holds blocks."""
        return self.kv_cache_manager.reset_prefix_cache()

    def make_stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=kv.usage,
            num_used_blocks=kv.num_usable_blocks - kv.num_free_blocks,
            # usable blocks (the null block excluded), so used / total == kv_cache_usage
            num_total_blocks=kv.num_usable_blocks,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
        )

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Hands out this step's token budget: running requests first, then waiting ones.

        NOTE on the algorithm (vLLM V1): there is no prefill or decode phase. Each request has
        num_computed_tokens and num_tokens; each step gives requests tokens so the former catches
        up with the latter, a long prompt in budget-sized chunks next to other requests' decodes.
        Out of blocks, the lowest-priority running request (fcfs: the last admitted) is
        preempted: its blocks are freed, it goes back to the front of the waiting queue and is
        recomputed later (its full blocks stay in the prefix cache, so that is cheap). A step
        that preempted admits no waiting request.
        """
        config = self.scheduler_config
        kv = self.kv_cache_manager
        token_budget = config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted_req_ids: list[str] = []
        chunk_cap = self._prefill_chunk_cap()

        req_index = 0
        while req_index < len(self.running) and token_budget > 0:
            request = self.running[req_index]
            try:
                num_computed = request.num_computed_tokens
                num_new = min(
                    request.num_planned_tokens - num_computed,
                    token_budget,
                    self.max_model_len - num_computed,
                    chunk_cap,  # a decode's 1 token is never capped
                )
                if num_new <= 0 or (
                    request.num_output_placeholders and self._ends_when_in_flight_lands(request)
                ):
                    # nothing to compute (the runner skipped its sample), or (async) the
                    # token in flight is its last
                    req_index += 1
                    continue
                block_ids = kv.allocate_slots(request, num_new)
                while block_ids is None:
                    victim, victim_index = self._preempt_lowest_priority()
                    preempted_req_ids.append(victim.request_id)
                    if victim is request:
                        break
                    if victim_index < req_index:  # only under "priority": it came earlier this step
                        req_index -= 1
                        for i, entry in enumerate(scheduled):
                            if entry.request is victim:
                                del scheduled[i]
                                token_budget += entry.num_scheduled_tokens
                                break
                    block_ids = kv.allocate_slots(request, num_new)
                if block_ids is None:
                    break
                scheduled.append(self._make_scheduled(request, num_computed, num_new, block_ids))
                token_budget -= num_new
                req_index += 1
            except Exception as e:  # noqa: BLE001 - one request's bookkeeping failed
                # it leaves self.running: the next request is at req_index now
                self._fail_on_exception(request, e)

        if not preempted_req_ids:
            token_budget = self._admit_waiting(scheduled, token_budget, chunk_cap)

        # Advance only now: ScheduledRequest keeps the step's start position for the runner.
        for entry in scheduled:
            request = entry.request
            request.num_computed_tokens = entry.num_computed_tokens + entry.num_scheduled_tokens
            if entry.is_sampling:
                request.num_output_placeholders += 1  # until update_from_output appends it
        finished_req_ids, self.finished_req_ids = self.finished_req_ids, []
        return SchedulerOutput(
            scheduled=scheduled,
            total_num_scheduled_tokens=config.max_num_batched_tokens - token_budget,
            preempted_req_ids=preempted_req_ids,
            finished_req_ids=finished_req_ids,
        )

    def _ends_when_in_flight_lands(self, request: Request) -> bool:
        """Async scheduling: the token the running step samples is the request's last by
        length (max_tokens or max_model_len), so scheduling past it would be wasted."""
        return request.num_output_placeholders > 0 and (
            request.num_output_tokens + request.num_output_placeholders >= request.max_tokens
            or request.num_planned_tokens >= self.max_model_len
        )

    def _prefill_chunk_cap(self) -> int:
        """The most prompt tokens one request may compute this step.

        long_prefill_token_threshold while some running request decodes (one token left to
        compute: its stream waits for the whole step), else the budget: a lone prompt, or
        prompts arriving together, prefill at full speed.
        """
        threshold = self.scheduler_config.long_prefill_token_threshold
        if threshold and any(r.num_tokens - r.num_computed_tokens <= 1 for r in self.running):
            return threshold
        return self.scheduler_config.max_num_batched_tokens

    def _admit_waiting(
        self, scheduled: list[ScheduledRequest], token_budget: int, chunk_cap: int
    ) -> int:
        """Admits waiting requests in queue order while budget, seats and blocks last.

        Returns the budget left. Under fcfs a waiting request never preempts a running one.
        """
        kv = self.kv_cache_manager
        max_num_seqs = self.scheduler_config.max_num_seqs
        is_chunked = self.scheduler_config.enable_chunked_prefill
        running_loras = self.lora_use.running_ids(self.running)
        skipped: list[Request] = []  # over max_loras: back in the queue, in order, below
        while len(self.waiting) > 0 and token_budget > 0 and len(self.running) < max_num_seqs:
            request = self.waiting.peek()
            if not self.lora_use.fits(request, running_loras):
                skipped.append(self.waiting.pop())
                continue
            if (
                len(self.running) >= max_num_seqs - self.scheduler_config.num_reserved_seqs
                and request.request_id not in self._urgent_req_ids
            ):
                break  # the seats left are reserved for urgent requests
            try:
                hit_block_ids, num_hit_tokens = kv.get_computed_blocks(request)
                num_remaining = min(request.num_tokens, self.max_model_len) - num_hit_tokens
                if (
                    not is_chunked
                    and token_budget < num_remaining <= self.scheduler_config.max_num_batched_tokens
                ):
                    # it fits a later step whole (longer ones are chunked anyway: no deadlock)
                    break
                num_new = min(num_remaining, token_budget, chunk_cap)
                block_ids = kv.allocate_slots(request, num_new, hit_block_ids, num_hit_tokens)
                if block_ids is None:
                    break
                self.waiting.pop()
                self.running.append(request)
                running_loras |= self.lora_use.running_ids([request])
                request.status = RequestStatus.RUNNING
                request.num_computed_tokens = num_hit_tokens
                if request.num_cached_tokens < 0:
                    request.num_cached_tokens = num_hit_tokens
                scheduled.append(self._make_scheduled(request, num_hit_tokens, num_new, block_ids))
                token_budget -= num_new
            except Exception as e:  # noqa: BLE001 - one request's bookkeeping failed
                self._fail_on_exception(request, e)  # it leaves the queue; the others go on
        self.waiting.add_front_in_order(skipped)
        return token_budget

    def _make_scheduled(
        self, request: Request, num_computed: int, num_new: int, block_ids: list[int]
    ) -> ScheduledRequest:
        return ScheduledRequest(
            request=request,
            num_computed_tokens=num_computed,
            num_scheduled_tokens=num_new,
            block_ids=block_ids,
            is_sampling=num_computed + num_new == request.num_planned_tokens,
        )

    def fail_staged(self, entry: ScheduledRequest, reason: str) -> None:
        """A request the runner left out of the step: nothing it was to write got written.

        The engine calls it as soon as the step is staged (before the next schedule, which
        async scheduling runs before this step's update_from_output)."""
        request = entry.request
        first = entry.num_computed_tokens // self.block_size
        last = -(-(entry.num_computed_tokens + entry.num_scheduled_tokens) // self.block_size)
        # those blocks entered the prefix cache when allocated (their KV was to come from
        # this step); no request may hit them now (every holder is left out as well)
        self.kv_cache_manager.uncache_block_ids(entry.block_ids[first:last])
        request.num_computed_tokens = entry.num_computed_tokens
        self.fail_request(request, reason)

    def _preempt_lowest_priority(self) -> tuple[Request, int]:
        """Frees the lowest-priority running request and requeues it for recompute.

        Returns the victim and the index it had in the running list.
        """
        if self.waiting.is_priority:
            victim_index = max(
                range(len(self.running)),
                # ties go to the later-admitted request
                key=lambda i: (self.running[i].priority, self.running[i].arrival_time, i),
            )
        else:
            victim_index = len(self.running) - 1
        victim = self.running.pop(victim_index)
        # free() first: it reads num_computed_tokens to tell valid cached blocks from unwritten
        self.kv_cache_manager.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_front(victim)
        return victim, victim_index

    # ---- after the step ------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> EngineCoreOutputs:
        """Appends each sampled token, finishes requests that hit a stop, frees their blocks."""
        outputs: list[EngineCoreOutput] = []
        sampled = runner_output.sampled_token_ids
        logprobs = runner_output.logprobs
        prompt_logprobs = runner_output.prompt_logprobs
        failed = runner_output.failed
        num_finished = 0
        for entry in scheduler_output.scheduled:
            request = entry.request
            req_id = request.request_id
            if entry.is_sampling:
                request.num_output_placeholders -= 1  # landed, or lost with the request
            if failed and req_id in failed:
                self.fail_staged(entry, failed[req_id])
                continue
            if prompt_logprobs and req_id in prompt_logprobs:
                request.add_prompt_logprobs(*prompt_logprobs[req_id])
            if not entry.is_sampling or request.is_finished:
                continue  # a prefill chunk, or aborted while the step ran
            token_id = sampled.get(req_id)
            if token_id is None:
                continue
            try:
                # (async scheduling: a request preempted while this step ran keeps the
                # token too, and recomputes it with the rest, as if preempted after the step)
                was_waiting = request.status == RequestStatus.PREEMPTED
                request.append_output_token_ids(token_id)
                if request.check_stop(token_id, self.max_model_len):
                    if was_waiting:
                        self.waiting.remove(request)
                    self._free_request(request)
                    num_finished += 1
                token_logprobs = logprobs.get(req_id)
                outputs.append(
                    EngineCoreOutput(
                        request_id=req_id,
                        new_token_ids=[token_id],
                        new_logprobs=[token_logprobs] if token_logprobs is not None else None,
                        finish_reason=request.finish_reason,
                        stop_reason=request.stop_reason,
                        num_cached_tokens=max(request.num_cached_tokens, 0),
                        prompt_logprobs=request.prompt_logprobs_to_send,
                    )
                )
            except Exception as e:  # noqa: BLE001 - one request's bookkeeping failed
                self._fail_on_exception(request, e)
        if num_finished:
            self.running = [r for r in self.running if not r.is_finished]
        outputs.extend(self._take_failure_outputs())
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.make_stats())
