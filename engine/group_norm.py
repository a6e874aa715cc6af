"""GroupNorm (+ SiLU) for the VAE decoder with statistics from our own reduction kernel.

Compiled, the decoder spends more time in inductor's GroupNorm reductions than in its
convolutions (on an H100 at 1024², batch 4: 65 ms of generated reductions and pointwise kernels
against 52 ms of convolutions): a group holds millions of elements and only batch × 32 groups
exist, so its reductions run on a few blocks. Here the statistics come from a Triton kernel that
splits each group over many programs (`group_moments`, an opaque custom op for the compiler), and
the normalisation, affine and SiLU stay plain tensor code, which inductor fuses into one
pointwise kernel. Same arithmetic as `nn.GroupNorm` in float32 (shifted sums, so no
cancellation), then the module's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_kernels = None


def _triton_kernels():
    """The kernels, built on first use (Triton comes with CUDA builds of torch only)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def moments_contiguous(x_ptr, shift_ptr, out_ptr, group_size, chunk, BLOCK: tl.constexpr):
        """One program: sums of (x - shift) and its square over `chunk` elements of one group
        (a group is contiguous in NCHW)."""
        group = tl.program_id(0)
        split = tl.program_id(1)
        base = x_ptr + group.to(tl.int64) * group_size
        shift = tl.load(shift_ptr + group)
        start = split * chunk
        end = tl.minimum(start + chunk, group_size)
        acc = tl.zeros([BLOCK], tl.float32)
        acc2 = tl.zeros([BLOCK], tl.float32)
        for offset in range(start, end, BLOCK):
            idx = offset + tl.arange(0, BLOCK)
            mask = idx < end
            d = tl.where(mask, tl.load(base + idx, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
            acc += d
            acc2 += d * d
        out = out_ptr + (group * tl.num_programs(1) + split) * 2
        tl.store(out, tl.sum(acc, axis=0))
        tl.store(out + 1, tl.sum(acc2, axis=0))

    @triton.jit
    def moments_channels_last(x_ptr, shift_ptr, out_ptr, pixels, chunk, C: tl.constexpr, G: tl.constexpr, BLOCK_P: tl.constexpr):
        """One program: per-group sums over `chunk` pixels of one image in NHWC (whole rows of
        C channels, so loads stay contiguous), reduced to the G groups at the end."""
        n = tl.program_id(0)
        split = tl.program_id(1)
        base = x_ptr + n.to(tl.int64) * pixels * C
        cols = tl.arange(0, C)
        shift = tl.load(shift_ptr + n * G + cols // (C // G))
        start = split * chunk
        end = tl.minimum(start + chunk, pixels)
        acc = tl.zeros([BLOCK_P, C], tl.float32)
        acc2 = tl.zeros([BLOCK_P, C], tl.float32)
        for offset in range(start, end, BLOCK_P):
            rows = offset + tl.arange(0, BLOCK_P)
            mask = (rows < end)[:, None]
            v = tl.load(base + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0)
            d = tl.where(mask, v.to(tl.float32) - shift[None, :], 0.0)
            acc += d
            acc2 += d * d
        sums = tl.sum(tl.reshape(tl.sum(acc, axis=0), [G, C // G]), axis=1)
        sums2 = tl.sum(tl.reshape(tl.sum(acc2, axis=0), [G, C // G]), axis=1)
        groups = tl.arange(0, G)
        out = out_ptr + ((n * tl.num_programs(1) + split) * G + groups) * 2
        tl.store(out, sums)
        tl.store(out + 1, sums2)

    _kernels = (moments_contiguous, moments_channels_last, triton.cdiv)
    return _kernels


PROGRAMS = 1024  # enough programs to fill an H100's 132 SMs several times over


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _moments_cuda(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    moments_contiguous, moments_channels_last, cdiv = _triton_kernels()
    n, c = x.shape[:2]
    pixels = x[0, 0].numel()
    count = (c // groups) * pixels
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and _power_of_two(c) and _power_of_two(groups):
        shift = x[:, :: c // groups, 0, 0].float().contiguous()  # (n, groups): each group's first element
        block = max(1, 4096 // c)
        chunk = cdiv(pixels, max(1, PROGRAMS // n))
        chunk = cdiv(chunk, block) * block
        splits = cdiv(pixels, chunk)
        partial = torch.empty((n, splits, groups, 2), device=x.device, dtype=torch.float32)
        moments_channels_last[(n, splits)](x, shift, partial, pixels, chunk, C=c, G=groups, BLOCK_P=block, num_warps=8)
        sums = partial.sum(dim=1)  # (n, groups, 2)
    else:
        x = x.contiguous()
        flat = x.view(n * groups, count)
        shift = flat[:, 0].float().contiguous()
        block = 2048
        chunk = cdiv(cdiv(count, max(1, PROGRAMS // (n * groups))), block) * block
        splits = cdiv(count, chunk)
        partial = torch.empty((n * groups, splits, 2), device=x.device, dtype=torch.float32)
        moments_contiguous[(n * groups, splits)](flat, shift, partial, count, chunk, BLOCK=block, num_warps=8)
        sums = partial.sum(dim=1).view(n, groups, 2)
        shift = shift.view(n, groups)
    mean_shifted = sums[..., 0] / count
    var = (sums[..., 1] / count - mean_shifted * mean_shifted).clamp_min(0.0)
    return shift + mean_shifted, var


@torch.library.custom_op("sd3serve::group_moments", mutates_args=())
def group_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of each (sample, group) of `x` (N, C, ...), in float32."""
    if x.is_cuda:
        return _moments_cuda(x, groups)
    var, mean = torch.var_mean(x.float().reshape(x.shape[0], groups, -1), dim=-1, correction=0)
    return mean, var


@group_moments.register_fake
def _(x, groups):
    shape = (x.shape[0], groups)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


class GroupNormSiLU(torch.nn.Module):
    """Drop-in for an `nn.GroupNorm` (and the SiLU after it, with `silu=True`)."""

    def __init__(self, norm: torch.nn.GroupNorm, silu: bool) -> None:
        super().__init__()
        self.norm = norm
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        n, c = x.shape[:2]
        groups = norm.num_groups
        mean, var = group_moments(x, groups)
        scale = torch.rsqrt(var + norm.eps).unsqueeze(-1)  # (n, groups, 1)
        shift = -mean.unsqueeze(-1) * scale
        if norm.affine:
            weight = norm.weight.float().view(1, groups, c // groups)
            scale, shift = scale * weight, shift * weight + norm.bias.float().view(1, groups, c // groups)
        else:
            scale, shift = scale.expand(n, groups, c // groups), shift.expand(n, groups, c // groups)
        view = (n, c) + (1,) * (x.dim() - 2)
        y = (x.float() * scale.reshape(view) + shift.reshape(view)).to(x.dtype)
        return F.silu(y) if self.silu else y


def fuse_vae_group_norms(vae: Any) -> int:
    """Replace the decoder's GroupNorm + SiLU pairs (in each resnet and before `conv_out`) by
    `GroupNormSiLU`. Returns the norms replaced."""
    from diffusers.models.resnet import ResnetBlock2D

    decoder = vae.decoder
    fused = 0
    for module in decoder.modules():
        if (
            isinstance(module, ResnetBlock2D)
            and module.time_emb_proj is None
            and isinstance(module.nonlinearity, torch.nn.SiLU)
            and isinstance(module.norm1, torch.nn.GroupNorm)
            and isinstance(module.norm2, torch.nn.GroupNorm)
        ):
            module.norm1 = GroupNormSiLU(module.norm1, silu=True)
            module.norm2 = GroupNormSiLU(module.norm2, silu=True)
            module.nonlinearity = torch.nn.Identity()  # applied inside both norms now
            fused += 2
    if isinstance(getattr(decoder, "conv_norm_out", None), torch.nn.GroupNorm) and isinstance(decoder.conv_act, torch.nn.SiLU):
        decoder.conv_norm_out = GroupNormSiLU(decoder.conv_norm_out, silu=True)
        decoder.conv_act = torch.nn.Identity()
        fused += 1
    return fused
