"""StepLoop: one engine core's steps, synchronous or with async scheduling.

A step is five calls joined by three dataclasses:
scheduler.schedule() -> SchedulerOutput -> runner.launch() (the forward) -> LaunchedStep ->
runner.sample() -> runner.collect() -> ModelRunnerOutput -> scheduler.update_from_output() ->
EngineCoreOutputs.

The token bitmask (grammars, allowed_token_ids, bad_words) is filled in runner.sample(), after
the forward is dispatched, so the fill runs while the device computes the forward (vLLM's
execute_model / sample_tokens split).

With async scheduling (vLLM's --async-scheduling) step k+1 is scheduled and its forward
launched before step k is collected, so the host's work for k+1 runs while the device computes
k; a decode of k+1 reads its input token from k's output on the device (the scheduler counts
it as a placeholder). k+1's sampler is dispatched right after its forward, unless some row's
sampler inputs follow the latest tokens (a grammar, bad_words, penalties): then step k is
collected and applied first (its grammars advance), and k+1's mask and penalty ids see k's
tokens while k+1's forward runs. So every request steps asynchronously, constrained and
penalized ones too. Stop checks land one step late: a request that step k finished has a
token in k+1 that is dropped.
"""

from __future__ import annotations

import dataclasses

from jaxserve.core.outputs import EngineCoreOutputs, ModelRunnerOutput, SchedulerOutput
from jaxserve.core.scheduler import Scheduler
from jaxserve.lora.manager import LoRAManager
from jaxserve.runner.model_runner import ModelRunner
from jaxserve.runner.step_outputs import LaunchedStep
from jaxserve.structured_output.token_mask import TokenMasks


@dataclasses.dataclass
class _InFlight:
    """A launched step not collected yet."""

    # what the scheduler planned, and what the runner dispatched of it
    scheduler_output: SchedulerOutput
    launched: LaunchedStep
    # req_id -> its adapter's name, for the step's requests on one (LoRA stats)
    lora_names: dict[str, str]


class StepLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        token_masks: TokenMasks,
        lora: LoRAManager | None,
        *,
        async_scheduling: bool,
    ) -> None:
        """lora: the adapters (None: LoRA off)."""
        self.scheduler = scheduler
        self.runner = runner
        self.token_masks = token_masks
        self.lora = lora
        # launch step k+1 before collecting step k
        self.async_scheduling = async_scheduling
        # the launched step not collected yet (async scheduling only, between steps)
        self.in_flight: _InFlight | None = None
        # steps launched on the device (a schedule with nothing to run is not one)
        self.num_steps = 0
        # highest KV cache usage while a step ran
        self.peak_kv_cache_usage = 0.0

    @property
    def has_work(self) -> bool:
        """A step is in flight, or some request is unfinished."""
        return self.in_flight is not None or self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        """One schedule -> launch -> sample -> collect -> update_from_output; with async
        scheduling, the outputs are those of the step launched by the previous call (none on
        the first), collected between this step's launch and its sample."""
        outputs = EngineCoreOutputs()
        in_flight, self.in_flight = self.in_flight, None
        launched = self._launch() if self.scheduler.has_unfinished_requests() else None
        # the sampler goes out at once unless it waits for the step in flight's tokens
        sampled = False
        if launched is not None and (in_flight is None or not self._reads_last_tokens(launched)):
            self._sample(launched)
            sampled = True
        if in_flight is not None:
            outputs = self._finish(in_flight)
        if launched is not None:
            if not sampled:
                self._sample(launched)
            if not self.async_scheduling:
                outputs = self._finish(launched)
            elif self.scheduler.has_unfinished_requests():
                self.in_flight = launched
            else:
                # every request it runs ended after it was scheduled: nothing in it is
                # wanted, so it is not waited for (its update still reports staging failures)
                last = self._finish(launched, wait=False)
                outputs = EngineCoreOutputs(
                    outputs=outputs.outputs + last.outputs, scheduler_stats=last.scheduler_stats
                )
        if launched is not None and launched.launched.out is not None:
            self.num_steps += 1  # a step ran on the device
        return outputs

    def _launch(self) -> _InFlight:
        """Schedules a step and dispatches its forward; requests that fail to stage fail at
        once."""
        scheduler_output = self.scheduler.schedule()
        # Usage peaks while the step runs (finished requests free their blocks after it).
        usage = self.scheduler.kv_cache_manager.usage
        self.peak_kv_cache_usage = max(self.peak_kv_cache_usage, usage)
        lora = self.lora
        lora_names: dict[str, str] = {}
        if lora is not None:
            # the step's adapters by request (finished ones leave the scheduler in the update)
            lora_names = {
                sr.request.request_id: sr.request.lora_request.lora_name
                for sr in scheduler_output.scheduled
                if sr.request.lora_request is not None
            }
            step_ids = {sr.request.lora_int_id for sr in scheduler_output.scheduled} - {0}
            lora.prepare(step_ids, self.scheduler.lora_use.running_ids(self.scheduler.running))
        launched = self.runner.launch(
            scheduler_output,
            lora_slot_of=(lambda r: lora.slot_of(r.lora_int_id)) if lora is not None else None,
        )
        in_flight = _InFlight(scheduler_output, launched, lora_names)
        # before anything is scheduled after this step (async: before its collect)
        self._fail(in_flight, launched.staged.failed)
        return in_flight

    def _reads_last_tokens(self, in_flight: _InFlight) -> bool:
        """Whether the step's sampler inputs follow its requests' latest tokens: a penalty's
        history, a grammar's state, bad_words. Only then does its sampler wait for the step
        before it to be read back; the others are dispatched right after their forward."""
        masks = self.token_masks
        if not masks.num_requests and not self.runner.input_batch.history_rows:
            return False  # (no row has a mask rule, penalties or min_tokens)
        return any(
            sr.is_sampling
            and (sr.request.sampling_params.has_penalties or masks.has_rules(sr.request.request_id))
            for sr in in_flight.launched.staged.staged
        )

    def _sample(self, in_flight: _InFlight) -> None:
        """Dispatches a launched step's sampler; its mask is filled while the forward runs."""
        masks = self.token_masks
        failed = self.runner.sample(
            in_flight.launched, fill_mask=masks.fill if masks.num_requests else None
        )
        self._fail(in_flight, failed)

    def _fail(self, in_flight: _InFlight, failed: dict[str, str]) -> None:
        """Fails the step's requests that could not be staged, each alone."""
        if not failed:
            return
        for entry in in_flight.scheduler_output.scheduled:
            reason = failed.get(entry.request.request_id)
            if reason is not None:
                self.scheduler.fail_staged(entry, reason)
                self.token_masks.remove(entry.request.request_id)

    def _finish(self, in_flight: _InFlight, *, wait: bool = True) -> EngineCoreOutputs:
        """Collects a launched step and applies its tokens (stops, frees, grammars, stats);
        wait=False: its tokens are not read (none of its requests is unfinished)."""
        if wait:
            runner_output = self.runner.collect(in_flight.launched)
        else:
            runner_output = ModelRunnerOutput(sampled_token_ids={})
        outputs = self.scheduler.update_from_output(in_flight.scheduler_output, runner_output)
        lora = self.lora
        if lora is not None:
            lora_names = in_flight.lora_names
            for o in outputs.outputs:
                if o.request_id in lora_names:
                    lora.stats.generated_tokens[lora_names[o.request_id]] += len(o.new_token_ids)
            lora.collect(self.scheduler.lora_use.refs)
        masks = self.token_masks
        if masks.num_requests:
            for o in outputs.outputs:
                masks.accept(o.request_id, o.new_token_ids)
                if o.finished:
                    masks.remove(o.request_id)
        return outputs

    def close(self) -> None:
        """Forgets the step in flight (its outputs go nowhere now)."""
        self.in_flight = None
