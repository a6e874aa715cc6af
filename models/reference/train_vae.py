"""The reference model's VAE training (models/reference/train.py runs it first): train until the
judge passes its reconstructions; and the helpers both trainings share."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from models.reference import data
from models.reference.evaluate import judge_images, save_grid

if TYPE_CHECKING:
    from models.reference.train import TrainConfig


def log(msg: str, sink: list[str]) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    sink.append(line)


def lr_at(elapsed: float, budget: float, step: int, peak: float, warmup: int) -> float:
    """Linear warmup by steps; constant; cosine decay to 10 % over the last 40 % of the time."""
    warm = min(1.0, (step + 1) / warmup)
    frac = elapsed / budget
    decay = 1.0 if frac < 0.6 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - 0.6) / 0.4)))
    return peak * warm * decay


def vae_judge(vae: torch.nn.Module, cfg: TrainConfig) -> tuple[float, float, torch.Tensor]:
    """Judge accuracy and MSE of reconstructions of held-out generator images."""
    specs = data.sample_specs(cfg.eval_images, seed=cfg.seed + 99, combos=data.all_combos())
    vae.eval()
    with torch.no_grad():
        x = data.render_torch(specs, device=cfg.device)
        rec = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(64)])
        mse = F.mse_loss(rec, x).item()
    vae.train()
    return judge_images(to_uint8(rec), [s.caption for s in specs]), mse, rec


def train_vae(vae: torch.nn.Module, cfg: TrainConfig, logs: list[str]) -> dict[str, float]:
    """Train for `vae_seconds`; then, while the judge fails the reconstructions, 20 s more at a
    time, up to `vae_extra_seconds`."""
    dev = cfg.device
    vae.to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    stream = data.batches(cfg.vae_batch, seed=cfg.seed + 1)
    start, last_log, step, deadline = time.perf_counter(), 0.0, 0, cfg.vae_seconds
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.startswith("cuda"))
    while True:
        while (elapsed := time.perf_counter() - start) < deadline:
            x = data.render_torch(next(stream), device=dev)
            with amp:
                post = vae.encode(x).latent_dist
                rec = vae.decode(post.sample()).sample.float()
            rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
            kl = post.kl().float().mean() / x[0].numel()
            loss = rec_loss + cfg.kl_weight * kl
            for g in opt.param_groups:
                g["lr"] = lr_at(min(elapsed, cfg.vae_seconds), cfg.vae_seconds, step, cfg.vae_lr, 100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            if elapsed - last_log > cfg.log_every:
                last_log = elapsed
                log(f"vae step {step} t={elapsed:.0f}s rec={rec_loss.item():.5f} kl={kl.item():.3f}", logs)
        acc, mse, rec = vae_judge(vae, cfg)
        log(
            f"vae at {step} steps, {elapsed:.0f}s: rec loss {rec_loss.item():.5f}, eval mse {mse:.5f}, "
            f"judge on reconstructions {acc:.3f}",
            logs,
        )
        if acc >= cfg.vae_target or deadline >= cfg.vae_seconds + cfg.vae_extra_seconds:
            break
        deadline += 20.0
    vae.eval()
    if cfg.artifacts:
        specs = data.sample_specs(16, seed=cfg.seed + 99, combos=data.all_combos())
        x = data.render_torch(specs, device=dev)
        pics = to_uint8(torch.cat([x, rec[:16]]))
        from PIL import Image

        save_grid([Image.fromarray(p) for p in pics], str(Path(cfg.artifacts) / "vae_recon.png"))
    return {
        "vae_steps": step,
        "vae_rec_loss": rec_loss.item(),
        "vae_eval_mse": mse,
        "vae_recon_judge": acc,
        "vae_seconds_used": elapsed,
    }


def to_uint8(x: torch.Tensor) -> list:
    import numpy as np

    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(a) for a in arr]
