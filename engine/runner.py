"""How a step runs on the device: per-request latents and sigma schedules, one transformer forward
per sub-batch with per-row timesteps and CFG rows, and the flow-match Euler update.

With caching off this is exactly `StableDiffusion3Pipeline.__call__` for each request: the same
CPU-generator noise, the same `encode_prompt` embeddings, the same scheduler sigmas and the same
float32 Euler arithmetic, just with rows of different requests (and timesteps) side by side.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from engine.attention import AttentionCache
from engine.graphs import ForwardGraphs
from engine.latent_aware import LatentAware
from engine.prompt_encoder import PromptEncoder
from engine.scheduler import ScheduledRequest, StepPlan
from engine.transfers import to_device, to_host_pixels


@dataclass
class RequestState:
    """A running request's tensors."""

    latents: torch.Tensor  # (1, C, h, w), model dtype
    timesteps: torch.Tensor  # (steps,)
    sigmas: torch.Tensor  # (steps + 1,), float32
    embeds: torch.Tensor  # (rows, seq, dim): [negative, prompt] with CFG, else [prompt]
    pooled: torch.Tensor  # (rows, dim)
    guidance: float
    # The `step` policy's last three guided velocities, newest first (when they were computed:
    # the request's `refreshes` in the scheduler).
    velocity: torch.Tensor | None = None
    previous_velocity: torch.Tensor | None = None
    older_velocity: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.embeds.shape[0]


class Runner:
    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        prompts: PromptEncoder,
        latent_aware: LatentAware,
        attention: AttentionCache | None,
        graphs: ForwardGraphs | None = None,
    ) -> None:
        self.pipe = pipe
        self.graphs = graphs
        self.prompts = prompts
        self.latent_aware = latent_aware
        self.attention = attention
        self.device = pipe._execution_device
        self.dtype = pipe.transformer.dtype
        self.states: dict[str, RequestState] = {}
        self._schedules: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # Host threads for the initial noise (torch's CPU sampling runs outside the GIL).
        self._noise_threads = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="sd3serve-noise")

    # -- admission -----------------------------------------------------------------------------
    def sigma_schedule(self, steps: int, latent_h: int, latent_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's own timesteps and sigmas for this step count and size."""
        key = (steps, latent_h, latent_w)
        if key not in self._schedules:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
            kwargs = {}
            if scheduler.config.get("use_dynamic_shifting", None):
                patch = self.pipe.transformer.config.patch_size
                kwargs["mu"] = calculate_shift(
                    (latent_h // patch) * (latent_w // patch),
                    scheduler.config.get("base_image_seq_len", 256),
                    scheduler.config.get("max_image_seq_len", 4096),
                    scheduler.config.get("base_shift", 0.5),
                    scheduler.config.get("max_shift", 1.16),
                )
            retrieve_timesteps(scheduler, steps, self.device, **kwargs)
            self._schedules[key] = (scheduler.timesteps, scheduler.sigmas.to(self.device, torch.float32))
        return self._schedules[key]

    @torch.inference_mode()
    def prepare(self, reqs: list[ScheduledRequest]) -> None:
        new = [r for r in reqs if r.request_id not in self.states]
        if not new:
            return
        # The encoders' work is queued on the device when `encode` returns; the pipeline's noise
        # (a CPU generator per request, as `randn_tensor` draws it) is sampled meanwhile on host
        # threads and copied without a synchronisation.
        embeddings = self.prompts.encode([(r.request.prompt, r.request.negative_prompt) for r in new])
        scale = self.pipe.vae_scale_factor
        channels = self.pipe.transformer.config.in_channels
        shapes = [(1, channels, r.request.height // scale, r.request.width // scale) for r in new]
        noise = [
            self._noise_threads.submit(host_noise, shape, r.request.seed, emb.prompt.dtype)
            for r, shape, emb in zip(new, shapes, embeddings)
        ]
        for req, emb, shape, sampled in zip(new, embeddings, shapes, noise):
            request = req.request
            latents = to_device(sampled.result(), self.device)
            timesteps, sigmas = self.sigma_schedule(request.steps, shape[2], shape[3])
            if request.uses_cfg:
                embeds = torch.cat([emb.negative, emb.prompt])
                pooled = torch.cat([emb.negative_pooled, emb.pooled])
            else:
                embeds, pooled = emb.prompt, emb.pooled
            self.states[req.request_id] = RequestState(latents, timesteps, sigmas, embeds, pooled, request.guidance_scale)

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    # -- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, plan: StepPlan) -> None:
        """Advance every request of `plan` by one denoising step."""
        if self.attention is not None:
            self.attention.drop_pools(plan.free_pools)
        self.prepare(list(plan.requests))
        states = [self.states[r.request_id] for r in plan.requests]
        # `step`-policy requests on a CACHED step skip the transformer and reuse their velocity.
        in_forward = [fresh or req.policy != "step" for req, fresh in zip(plan.requests, plan.fresh)]
        velocities: list[torch.Tensor | None] = [None] * len(states)
        # FRESH requests first: the attention cache then slices their rows and concatenates the
        # cached ones after them (engine/slot_pool.py) instead of gathering and scattering.
        forward_ids = sorted((i for i, used in enumerate(in_forward) if used), key=lambda i: not plan.computes_attention(i))
        if forward_ids:
            outputs = self._forward(plan, states, forward_ids)
            for i, v in zip(forward_ids, outputs):
                velocities[i] = v
        for i, (req, state) in enumerate(zip(plan.requests, states)):
            if velocities[i] is None:
                older = plan.older_weights[i] if plan.older_weights else 0.0
                velocities[i] = self.latent_aware.reuse_velocity(state, plan.weights[i], older)
            elif req.policy == "step":
                state.older_velocity, state.previous_velocity, state.velocity = (
                    state.previous_velocity,
                    state.velocity,
                    velocities[i],
                )
        self._euler(plan, states, cast(list[torch.Tensor], velocities))  # every one is set now

    def _forward(self, plan: StepPlan, states: list[RequestState], ids: list[int]) -> list[torch.Tensor]:
        rows = [states[i].rows for i in ids]
        hidden = torch.cat([states[i].latents.expand(states[i].rows, -1, -1, -1) for i in ids])
        timestep = torch.cat([states[i].timesteps[plan.requests[i].step].expand(states[i].rows) for i in ids])
        embeds = torch.cat([states[i].embeds for i in ids])
        pooled = torch.cat([states[i].pooled for i in ids])
        step = None if self.attention is None else self.attention.begin_step(plan, ids)
        inputs = dict(hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled)
        if self.graphs is not None and self.graphs.applies(hidden, step):
            out = self.graphs(step, **inputs)
        else:
            extra = {} if step is None else step.forward_kwargs()
            out = self.pipe.transformer(**inputs, **({"joint_attention_kwargs": extra} if extra else {}), return_dict=False)[0]
        velocities = []
        for i, chunk in zip(ids, out.split(rows)):
            if states[i].rows == 2:
                uncond, text = chunk.chunk(2)
                velocities.append(uncond + states[i].guidance * (text - uncond))
            else:
                velocities.append(chunk)
        return velocities

    def _euler(self, plan: StepPlan, states: list[RequestState], velocities: list[torch.Tensor]) -> None:
        steps = [r.step for r in plan.requests]
        sigma = torch.stack([s.sigmas[k] for s, k in zip(states, steps)]).view(-1, 1, 1, 1)
        sigma_next = torch.stack([s.sigmas[k + 1] for s, k in zip(states, steps)]).view(-1, 1, 1, 1)
        latents = torch.cat([s.latents for s in states])
        v = torch.cat(velocities)
        exact = latents.to(torch.float32) + (sigma_next - sigma) * v
        stale = [not f for f in plan.fresh]
        if any(stale) and self.latent_aware.corrects_update:
            corrected = self.latent_aware.update(latents.to(torch.float32), v, sigma, sigma_next)
            mask = torch.tensor(stale, device=latents.device).view(-1, 1, 1, 1)
            exact = torch.where(mask, corrected, exact)
        new = exact.to(v.dtype)
        for state, lat in zip(states, new.split(1)):
            state.latents = lat

    # -- finishing -----------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, request_ids: list[str]) -> list[Image.Image]:
        """Decode finished requests of one size, up to `DECODE_PIXELS` per VAE call (diffusers
        decodes a whole batch at once, which bounds the batch by the VAE's memory, not the
        transformer's). Every chunk is queued on the device before the host waits for the first,
        so the host turns chunk i into PIL images while the device decodes chunk i + 1."""
        if not request_ids:
            return []
        vae = self.pipe.vae
        latents = torch.cat([self.states[i].latents for i in request_ids])
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        pending = []
        chunk_size = max(1, DECODE_PIXELS // (latents.shape[-2] * latents.shape[-1] * self.pipe.vae_scale_factor**2))
        for chunk in latents.split(chunk_size):
            images = vae.decode(chunk.to(vae.dtype), return_dict=False)[0]
            pending.append(to_host_pixels(images))
        out: list[Image.Image] = []
        for pixels, ready in pending:
            if ready is not None:
                ready.synchronize()
            out.extend(Image.fromarray(p) for p in pixels.numpy())
        return out


def host_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The pipeline's initial latents for `seed`: `randn_tensor` with a CPU generator, on the host."""
    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=torch.device("cpu"), dtype=dtype)


# Four 1024² images per VAE call: the decoder's largest activation stays under 2**31 elements,
# so the compiled decoder keeps its int32 indexing and does not recompile for a larger chunk.
DECODE_PIXELS = 4 * 1024 * 1024
