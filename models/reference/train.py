"""Train the reference model: the VAE first (until its reconstructions pass the judge), then
the SD3 transformer and the three text encoders together with rectified-flow matching
(logit-normal timesteps, 10 % empty prompts for classifier-free guidance, EMA weights).

    python -m models.reference.train --out models/sd3-shapes --device cuda \
        --vae-seconds 110 --dit-seconds 300 --batch 512

Training budgets are wall-clock seconds, so a run ends on time whatever the card. Data is
rendered on the fly on the training device (models.reference.data); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.utils import logging as diffusers_logging

from models.reference import data
from models.reference.build import SERVE_FILE, ModelSpec, ServeDefaults, build_pipeline, param_count, save_pipeline
from models.reference.evaluate import generate, save_grid, sweep
from models.reference.text import TextBatcher, encode_tokens
from models.reference.train_vae import log, lr_at, train_vae


@dataclass(frozen=True)
class TrainConfig:
    out: str = "models/sd3-shapes"
    device: str = "cuda"
    seed: int = 0
    vae_seconds: float = 110.0
    vae_extra_seconds: float = 60.0  # more VAE training, taken from the transformer, until the judge passes
    vae_target: float = 0.98  # judge accuracy on reconstructions
    vae_batch: int = 64
    vae_lr: float = 5e-4
    kl_weight: float = 1e-6
    pool: int = 98304  # training latents encoded once by the frozen VAE
    dit_seconds: float = 300.0
    batch: int = 512
    lr: float = 3e-4
    warmup: int = 300
    drop_caption: float = 0.1  # rows trained on the empty prompt, for classifier-free guidance
    ema: float = 0.999
    eval_images: int = 280
    log_every: float = 15.0  # seconds
    artifacts: str = ""  # folder for sample grids and reconstructions
    resume: str = ""  # a saved pipeline folder: keep its VAE, train its transformer and text encoders further
    sweep_steps: str = "12,16,20,28"
    max_serve_steps: int = 28  # serving defaults must keep a CPU image under ~1 s


@torch.no_grad()
def encode_pool(vae: torch.nn.Module, cfg: TrainConfig, text: TextBatcher) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Latents of `cfg.pool` training images plus their caption ids; and shift/scale factors."""
    rng = random.Random(cfg.seed + 2)
    combos = data.training_combos()
    lat, ids = [], []
    for start in range(0, cfg.pool, 1024):
        specs = [data.random_spec(rng, rng.choice(combos)) for _ in range(min(1024, cfg.pool - start))]
        x = data.render_torch(specs, device=cfg.device)
        lat.append(vae.encode(x).latent_dist.sample().to(torch.bfloat16))
        ids.append(torch.tensor([text.index(s.caption) for s in specs]))
    latents = torch.cat(lat)
    flat = latents.float()
    shift, scale = flat.mean().item(), 1.0 / flat.std().item()
    return latents, torch.cat(ids).to(cfg.device), shift, scale


def train_transformer(pipe, cfg: TrainConfig, logs: list[str]) -> dict[str, float]:
    dev = cfg.device
    t5_len = ServeDefaults().max_sequence_length
    text = TextBatcher(
        [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3], [data.caption(*c) for c in data.all_combos()], t5_len, dev
    )
    latents, caption_ids, shift, scale = encode_pool(pipe.vae, cfg, text)
    if cfg.resume:  # the transformer already learned the saved normalisation
        shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    log(f"pool {tuple(latents.shape)} shift_factor={shift:.4f} scaling_factor={scale:.4f}", logs)
    encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    modules = [pipe.transformer, *encoders]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.to(dev).train()
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.startswith("cuda"))
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + 3)
    start, last_log, step = time.perf_counter(), 0.0, 0
    recent: deque[torch.Tensor] = deque(maxlen=200)
    while step == 0 or (elapsed := time.perf_counter() - start) < cfg.dit_seconds:
        elapsed = time.perf_counter() - start
        idx = torch.randint(0, latents.shape[0], (cfg.batch,), device=dev, generator=gen)
        x0 = (latents[idx].float() - shift) * scale
        cap = caption_ids[idx]
        drop = torch.rand(cfg.batch, device=dev, generator=gen) < cfg.drop_caption
        cap = torch.where(drop, torch.full_like(cap, text.empty_index), cap)
        noise = torch.randn(x0.shape, device=dev, generator=gen)
        t = torch.sigmoid(torch.randn(cfg.batch, device=dev, generator=gen))  # logit-normal(0, 1)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        with amp:
            prompt_embeds, pooled = encode_tokens(encoders, text.ids(cap), pipe.transformer.config.joint_attention_dim)
            pred = pipe.transformer(
                hidden_states=xt,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                timestep=t * 1000,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        for g in opt.param_groups:
            g["lr"] = lr_at(elapsed, cfg.dit_seconds, step, cfg.lr, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(cfg.ema, (1 + step) / (10 + step)))
        step += 1
        recent.append(loss.detach())
        if elapsed - last_log > cfg.log_every:
            last_log = elapsed
            mean = torch.stack(list(recent)[-50:]).mean().item()
            log(f"dit step {step} t={elapsed:.0f}s loss={mean:.4f} lr={opt.param_groups[0]['lr']:.2e}", logs)
    final = torch.stack(list(recent)).mean().item()
    log(f"dit done: {step} steps ({step * cfg.batch} samples), final loss (mean of last {len(recent)}) {final:.4f}", logs)
    raw = [p.detach().clone() for p in params]
    for m in modules:
        m.eval()
    return {
        "dit_steps": step,
        "dit_final_loss": final,
        "samples_seen": step * cfg.batch,
        "shift_factor": shift,
        "scaling_factor": scale,
        "_params": params,
        "_ema": ema,
        "_raw": raw,
    }


def round_to_saved_precision(pipe) -> None:
    for m in (pipe.transformer, pipe.vae):
        m.to(torch.float16).to(torch.float32)


def load_weights(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(defaults).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--layers", type=int, default=ModelSpec().layers)
    ap.add_argument("--width", type=int, default=ModelSpec().width)
    args = vars(ap.parse_args(argv))
    spec = ModelSpec(layers=args.pop("layers"), width=args.pop("width"))
    cfg = TrainConfig(**args)
    logs: list[str] = []
    diffusers_logging.set_verbosity_error()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    out = Path(cfg.out)
    card = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu"
    if cfg.resume:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(cfg.resume, dtype=torch.float32)
        spec = ModelSpec(
            **{
                **asdict(spec),
                "layers": pipe.transformer.config.num_layers,
                "width": pipe.transformer.config.num_attention_heads * 64,
            }
        )
        before = json.loads((Path(cfg.resume) / "training_stats.json").read_text())
        before.pop("sweep", None)
    else:
        pipe = build_pipeline(spec, tempfile.mkdtemp(), seed=cfg.seed)
    log(
        f"spec {spec} on {card}; transformer {param_count(pipe.transformer) / 1e6:.2f}M, "
        f"vae {param_count(pipe.vae) / 1e6:.2f}M params",
        logs,
    )
    stats: dict = {
        "card": card,
        "spec": asdict(spec),
        "config": asdict(cfg),
        "params": {
            n: param_count(getattr(pipe, n)) for n in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        },
    }
    if cfg.resume:
        stats["previous_run"] = before
        pipe.vae.to(cfg.device).eval()
        extra_vae = 0.0
    else:
        stats |= train_vae(pipe.vae, cfg, logs)
        extra_vae = stats["vae_seconds_used"] - cfg.vae_seconds
    pipe.vae.requires_grad_(False)
    dit = train_transformer(pipe, replace(cfg, dit_seconds=max(cfg.dit_seconds - max(0.0, extra_vae), cfg.dit_seconds / 2)), logs)
    params, ema, raw = dit.pop("_params"), dit.pop("_ema"), dit.pop("_raw")
    stats |= dit
    pipe.to(cfg.device, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = data.held_out_prompts()[: cfg.eval_images]
    results = {}
    for name, weights in (("raw", raw), ("ema", ema)):
        load_weights(params, weights)
        round_to_saved_precision(pipe)  # judge what the files will hold
        results[name] = sweep(pipe, prompts, steps=(20,), guidances=(5.0,), shifts=(3.0,))[0]["accuracy"]
        log(f"{name} weights: judge accuracy {results[name]:.3f} at 20 steps, cfg 5, shift 3", logs)
    chosen = max(results, key=results.get)
    load_weights(params, ema if chosen == "ema" else raw)
    stats |= {"weights": chosen, "weights_accuracy": results, "train_wall_seconds": time.perf_counter() - t0}
    serve = ServeDefaults()
    save_pipeline(pipe.to("cpu"), out, serve)  # saved now, so a failing sweep loses nothing
    (out / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"saved {out} ({chosen} weights); {time.perf_counter() - t0:.0f}s so far", logs)
    pipe.to(cfg.device, torch.float32)
    steps = tuple(int(n) for n in cfg.sweep_steps.split(","))
    grid = sweep(pipe, prompts, steps=steps, guidances=(3.0, 5.0, 7.0), shifts=(1.0, 3.0))
    for row in grid:
        log(
            f"sweep steps={row['steps']} cfg={row['guidance']} shift={row['shift']}: {row['accuracy']:.3f} "
            f"(held-out combos {row['held_out_combo_accuracy']:.3f})",
            logs,
        )
    fast = [r for r in grid if r["steps"] <= cfg.max_serve_steps] or grid
    best = max(fast, key=lambda r: (r["accuracy"], r["guidance"] == 5.0, -r["steps"]))
    pipe.scheduler.register_to_config(shift=best["shift"])
    pipe.scheduler.save_pretrained(out / "scheduler")
    serve = ServeDefaults(steps=best["steps"], guidance_scale=best["guidance"])
    (out / SERVE_FILE).write_text(json.dumps(asdict(serve), indent=2) + "\n")
    stats |= {"sweep": grid, "chosen": best, "wall_seconds": time.perf_counter() - t0}
    (out / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if cfg.artifacts:
        samples = generate(
            pipe, [p.prompt for p in prompts[:40]], [p.seed for p in prompts[:40]], serve.steps, serve.guidance_scale
        )
        save_grid(samples, str(Path(cfg.artifacts) / "samples.png"))
    log(f"done: {out} with {serve}, shift {best['shift']}; total {time.perf_counter() - t0:.0f}s", logs)


if __name__ == "__main__":
    main()
