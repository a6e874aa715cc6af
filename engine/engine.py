"""The step loop: schedule -> run -> finish. One `step()` advances one sub-batch by one step."""

from __future__ import annotations

import gc
import logging
import time
from typing import Callable

import torch
from PIL import Image

from engine.attention import AttentionCache, attention_cache_bytes
from engine.cache_presets import CACHE_PRESETS
from engine.config import EngineConfig, limits_for_model, read_model_defaults
from engine.fair_share import StepCharge, StepCosts
from engine.graphs import ForwardGraphs
from engine.latent_aware import make_latent_aware
from engine.loader import load_pipeline
from engine.prompt_encoder import PromptEncoder
from engine.request import GenerationRequest, RequestValidationError, validate_request
from engine.step_report import FailedRequest, FinishedRequest, RequestFailed, StepReport
from engine.runner import Runner
from engine.scheduler import ScheduledRequest, Scheduler
from engine.speed import SpeedOptions, apply_speed, speed_options_for
from engine.step_timer import StepTimer
from engine.warm_up import warm_up

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQUENCE_LENGTH = 256


class Engine:
    def __init__(self, config: EngineConfig, pipe, speed: SpeedOptions | None = None) -> None:
        """`speed`: the speed work to apply (engine/speed.py); by default from `config.compile`."""
        self.config = config
        self.pipe = pipe
        self.speed = speed if speed is not None else speed_options_for(config, pipe._execution_device)
        self.speed_applied = apply_speed(pipe, self.speed)
        defaults = read_model_defaults(config.model)
        self.max_sequence_length = config.max_sequence_length or defaults.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)
        self.limits = limits_for_model(config.limits, config.model)
        for width, height in config.warm_dimensions():  # refused at start, by the request rules
            try:
                validate_request(dict(prompt="warm-up", width=width, height=height), self.limits)
            except RequestValidationError as exc:
                raise ValueError(f"warm_sizes (SD3SERVE_WARM_SIZES): {width}x{height} can't be served: {exc}") from None
        self.latent_aware = make_latent_aware(config.latent_aware)
        self.attention = AttentionCache(pipe.transformer, history=self.latent_aware.history)
        prompts = PromptEncoder(pipe, self.max_sequence_length, config.prompt_cache_size)
        graphs = None
        if self.speed.cuda_graphs and pipe._execution_device.type == "cuda":
            graphs = ForwardGraphs(pipe.transformer, self.speed.graph_max_tokens, self.attention)
        self.runner = Runner(pipe, prompts, self.latent_aware, self.attention, graphs)
        self._sigma_lists: dict[tuple[int, int, int], list[float]] = {}
        self.scheduler = Scheduler(
            max_batch=config.max_batch,
            admit_per_boundary=config.admit_per_boundary,
            warmup_steps=config.warmup_steps,
            final_fresh_steps=config.final_fresh_steps,
            interval_growth=config.interval_growth,
            min_fresh_per_step=config.min_fresh_per_step,
            presets=CACHE_PRESETS if config.cache_presets else {},
            default_policy=config.cache_policy,
            cache_budget_bytes=config.cache_budget_mb * 2**20,
            slot_bytes_of=self.slot_bytes,
            step_costs=StepCosts(),  # sizes share the device fairly in measured seconds
            extrapolation_order=self.latent_aware.order,
            extrapolation_times=self.sigmas_of if self.latent_aware.clock == "sigma" else None,
            ready=lambda request: prompts.ready((request.prompt, request.negative_prompt)),
        )
        self.step_timer: StepTimer[StepCharge] = StepTimer(
            pipe._execution_device, max_in_flight=config.max_steps_in_flight, plan_lead=config.plan_lead_ms / 1000.0
        )

    @classmethod
    def from_config(cls, config: EngineConfig) -> "Engine":
        return cls(config, load_pipeline(config))

    # -- the contract the worker and the CLI use ----------------------------------------------
    def admission_slots(self) -> int:
        return self.scheduler.admission_slots()

    def add(self, request: GenerationRequest) -> None:
        """Queue `request`; its prompt is encoded on the prompt thread meanwhile (engine/prompt_encoder.py)."""
        self.add_many([request])

    def add_many(self, requests: list[GenerationRequest]) -> None:
        """Queue `requests` with their texts handed to the prompt thread in one go, so they are
        encoded as one batch. Texts handed over one request at a time are batched as the thread
        finds them, and a text's embedding can differ in its last bits with its batch (CLIP's
        pooled projection does on the CPU): `run` admits through here so that the same requests
        given together give the same images every time."""
        for request in requests:
            self.scheduler.add(request)
        self.runner.prompts.prefetch([(r.prompt, r.negative_prompt) for r in requests])

    def cancel(self, request_id: str) -> bool:
        return self.scheduler.cancel(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def progress(self, request_id: str) -> tuple[int, int] | None:
        for req in self.scheduler.running_requests():
            if req.request_id == request_id:
                return req.step, req.total
        for request in self.scheduler.waiting:
            if request.request_id == request_id:
                return 0, request.steps
        return None

    def running_ids(self) -> list[str]:
        return [r.request_id for r in self.scheduler.running_requests()]

    def cache_bytes(self) -> int:
        """Attention-cache bytes of the running requests' slots (what admission counts)."""
        return self.scheduler.cache_bytes()

    def cache_allocated_bytes(self) -> int:
        """Bytes of the attention cache's pools, free slots and idle sizes included."""
        return self.scheduler.cache_allocated_bytes()

    def trim_cache(self) -> None:
        """Free the attention-cache pools of every size no running request uses."""
        self.attention.drop_pools(self.scheduler.trim())

    def request_cache_bytes(self, request: GenerationRequest, policy: str) -> int:
        return self.scheduler.cache_bytes_of(request, policy)

    def slot_bytes(self, key: tuple[int, int]) -> int:
        """Bytes of one attention-cache slot (one CFG row, every layer) at image size `key`."""
        height, width = key
        scale = self.pipe.vae_scale_factor
        return attention_cache_bytes(
            self.pipe.transformer.config,
            (height // scale, width // scale),
            self.pipe.tokenizer_max_length + self.max_sequence_length,
            rows=1,
            element_size=self.pipe.transformer.dtype.itemsize,
            history=self.latent_aware.history,
        )

    def sigmas_of(self, request: GenerationRequest) -> list[float]:
        """The request's sigma at each step (the pipeline's schedule for its steps and size)."""
        scale = self.pipe.vae_scale_factor
        key = (request.steps, request.height // scale, request.width // scale)
        if key not in self._sigma_lists:
            self._sigma_lists[key] = self.runner.sigma_schedule(*key)[1].tolist()
        return self._sigma_lists[key]

    def step(self) -> StepReport:
        report = StepReport(canceled=self.drop_canceled())
        if self.scheduler.waiting and not self.scheduler.num_running():
            # An idle device waits for the prompts (not a spin); jobs that came together start together.
            self.runner.prompts.wait_for_all(timeout=1.0)
        plan = self.scheduler.plan()
        if plan is None:
            return report
        now = time.monotonic()
        try:
            # New requests' prompts are encoded (and their noise drawn) outside the step's timing:
            # a job's encoding is its own, not the device time of its size's sub-batch, which the
            # fair share and its cost model (engine/fair_share.py) count.
            self.runner.prepare(list(plan.requests))
            self.step_timer.start()
            self.runner.run(plan)
        except torch.OutOfMemoryError as exc:
            return self._fail_plan(plan, report, "out_of_memory", exc)
        if plan.charge is not None:
            self.step_timer.stop(plan.charge, plan.charge.cost)
        # Return with fewer than `max_steps_in_flight` steps on the device (with 2: this one), so the
        # caller's admissions and the next plan see a device a step behind, not a launch queue's worth.
        self.step_timer.wait_for_room()
        finished = self.scheduler.complete(plan)
        report.measured = self.observe_step_costs()
        report.batch_size = len(plan.requests)
        report.size = plan.key
        report.fresh_ratio = plan.fresh_ratio
        if finished:
            self._finish(finished, report)
        report.step_seconds = time.monotonic() - now
        return report

    def observe_step_costs(self) -> list[tuple[tuple[int, int], float]]:
        """Hand the scheduler the device seconds of the steps the device has finished; each with
        its sub-batch size, oldest first."""
        measured = []
        for charge, seconds in self.step_timer.done():
            self.scheduler.observe(charge, seconds)
            measured.append((charge.key, seconds))
        return measured

    def _finish(self, finished: list[ScheduledRequest], report: StepReport) -> None:
        ids = [r.request_id for r in finished]
        images = self.runner.decode(ids)
        done = time.monotonic()
        for req, image in zip(finished, images):
            seconds = done - req.admitted_at
            report.finished.append(FinishedRequest(req.request, image, seconds, req.fresh_steps))
            self._forget(req)

    def _fail_plan(self, plan, report: StepReport, code: str, exc: Exception) -> StepReport:
        """Out of memory: fail the newest request of the sub-batch so the rest can go on
        with a smaller batch (a lone request that does not fit fails with the same error)."""
        self.trim_cache()
        if self.runner.graphs is not None:
            self.runner.graphs.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        victim = max(plan.requests, key=lambda r: r.admitted_at)
        victim.canceled = True
        self.drop_canceled()  # only the victim: step() dropped the rest already
        log.warning("step failed (%s); dropping request %s: %s", code, victim.request_id, exc)
        report.failed.append(
            FailedRequest(victim.request, code, f"the GPU ran out of memory with a batch of {len(plan.requests)}: {exc}")
        )
        return report

    def drop_canceled(self) -> list[GenerationRequest]:
        """Drop canceled running requests now and free their state; returns them."""
        dropped = self.scheduler.drop_canceled()
        for req in dropped:
            self._forget(req)
        return [req.request for req in dropped]

    def _forget(self, req: ScheduledRequest) -> None:
        self.runner.release(req.request_id)

    def warm_up(self) -> float:
        """Compile and capture before serving (engine/warm_up.py); minutes, so a worker runs it
        before taking jobs. Returns seconds spent."""
        return warm_up(self)

    @staticmethod
    def freeze_heap() -> None:
        """Put every object alive after loading and compiling (modules, compiled graphs, the
        compiler's caches) out of the cyclic garbage collector's reach, so a full collection
        does not walk them again in some step. What serving allocates later is still collected.
        (On the H100 bench, GC ran at most 5 ms per 28-step run after this.)"""
        gc.collect()
        gc.freeze()

    def run(
        self, requests: list[GenerationRequest], progress: Callable[[StepReport], None] | None = None
    ) -> list[FinishedRequest]:
        """The one loop that drives the engine to completion (the CLI, the stock-RQ job function,
        tests and the bench; the batching worker calls `step` itself): admit `requests` as slots
        open, step until all are done, call `progress` after every step. Returns the finished
        requests in the order they finished; raises `RequestFailed` on the first failure."""
        pending = list(requests)
        finished: list[FinishedRequest] = []
        while pending or self.has_work():
            admitted = min(self.admission_slots(), len(pending))
            if admitted:
                self.add_many(pending[:admitted])
                del pending[:admitted]
            # Offline nothing else waits for the device: each request joins at the first boundary
            # after it was given, as it would with its prompt encoded in the step.
            self.runner.prompts.wait_for_all()
            report = self.step()
            finished.extend(report.finished)
            if progress is not None:
                progress(report)
            if report.failed:
                raise RequestFailed(report.failed)
        return finished

    def generate(
        self, requests: list[GenerationRequest], progress: Callable[[StepReport], None] | None = None
    ) -> dict[str, Image.Image]:
        """Run `requests` to completion as one step-level batch; images by request id."""
        return {item.request.request_id: item.image for item in self.run(requests, progress)}
