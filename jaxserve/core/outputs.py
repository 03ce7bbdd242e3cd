"""The typed messages between scheduler, runner and engine client.

schedule() -> SchedulerOutput -> runner.launch() + collect() -> ModelRunnerOutput
-> scheduler.update_from_output() -> EngineCoreOutputs. All host values (lists, ints), never
device arrays: EngineCoreOutputs crosses the process boundary to the API server (engine/ipc.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxserve.request import FinishReason, Request, TokenLogprobs


@dataclass
class ScheduledRequest:
    # the request itself; the runner only reads it (tokens, sampling params, seed)
    request: Request
    # position of the first token computed this step (= request.num_computed_tokens at
    # schedule time; the scheduler advances the request's counter right after scheduling)
    num_computed_tokens: int
    # tokens computed this step: all_token_ids[num_computed_tokens : + num_scheduled_tokens]
    num_scheduled_tokens: int
    # the request's whole block table (block ids, in token order)
    block_ids: list[int]
    # True when this chunk reaches the request's last known token, so the step samples one
    is_sampling: bool


@dataclass
class SchedulerOutput:
    # the requests of this step, in scheduling order (the runner's InputBatch picks their rows)
    scheduled: list[ScheduledRequest]
    # sum of num_scheduled_tokens over `scheduled`
    total_num_scheduled_tokens: int
    # requests preempted (blocks freed, back to waiting) while building this step
    preempted_req_ids: list[str] = field(default_factory=list)
    # requests finished or aborted since the previous step
    finished_req_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    # req_id -> the token sampled this step (only requests with is_sampling)
    sampled_token_ids: dict[str, int]
    # req_id -> logprobs of that token, for requests that asked for logprobs
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # req_id -> (index of the first entry in the request's prompt_logprobs, the entries)
    # computed this step, for requests with prompt_logprobs whose prompt ran in it
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # req_id -> why the runner could not stage (or read back) the request's part of the step;
    # it was left out of the device call (see EngineCore.step), the others ran without it
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class SchedulerStats:
    # requests in the running set / waiting queue after this step
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    # fraction of usable KV blocks (all but the null block) held by requests
    kv_cache_usage: float = 0.0
    # blocks held by requests (not counting free cached blocks)
    num_used_blocks: int = 0
    num_total_blocks: int = 0
    # cumulative prefix-cache lookups and hits, in tokens
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # cumulative preemptions
    num_preemptions: int = 0
    # filled by the engine core, not the scheduler: cumulative steps and seconds spent in
    # them (schedule + execute + update), and XLA compiles after warmup (must stay 0)
    num_steps: int = 0
    step_seconds_total: float = 0.0
    num_compiles_after_warmup: int = 0
    # data parallel only (else empty): requests routed to each replica so far, by index
    requests_per_replica: list[int] = field(default_factory=list)
    # filled by the API process (AsyncLLM), not the core: engine-core processes it restarted
    num_core_restarts: int = 0
    # LoRA, filled by the engine core (all 0/empty with LoRA off): adapters read from disk,
    # dropped from host memory, and evicted from a device slot (cumulative)
    lora_loads: int = 0
    lora_cpu_evictions: int = 0
    lora_slot_evictions: int = 0
    # per adapter name, cumulative: requests admitted, tokens generated
    lora_requests: dict[str, int] = field(default_factory=dict)
    lora_generated_tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    request_id: str
    # tokens generated since the last output for this request
    new_token_ids: list[int]
    # logprobs of those tokens, when the request asked for them
    new_logprobs: list[TokenLogprobs] | None = None
    # set once, on the request's last output
    finish_reason: FinishReason | None = None
    # the stop token id or stop string that ended it
    stop_reason: int | str | None = None
    # prompt tokens served from the prefix cache (usage.prompt_tokens_details.cached_tokens)
    num_cached_tokens: int = 0
    # set (with finish_reason "abort") when the engine failed this request alone: its part of
    # a step could not be staged. A short reason, never a traceback; the engine-core process
    # turns it into an ipc.Error for the request
    error: str | None = None
    # with SamplingParams.prompt_logprobs: on the request's first output, one entry per prompt
    # token after the first (token_id is that prompt token)
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput] = field(default_factory=list)
    scheduler_stats: SchedulerStats | None = None
