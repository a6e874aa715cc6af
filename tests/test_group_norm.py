"""The VAE decoder's GroupNorm with our statistics kernel (engine/group_norm.py): the same
numbers as `nn.GroupNorm` + SiLU, in every layout, compiled or not; the Triton kernel on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.group_norm import GroupNormSiLU, fuse_vae_group_norms, group_moments
from engine.tiny import sd3_vae


def _input(shape, channels_last=False, dtype=torch.float32, offset=0.0, device="cpu"):
    g = torch.Generator("cpu").manual_seed(0)
    x = (torch.randn(shape, generator=g) * 0.5 + offset).to(device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _norm(channels: int, groups: int, affine: bool = True) -> torch.nn.GroupNorm:
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, channels))
            norm.bias.copy_(torch.linspace(-0.2, 0.2, channels))
    return norm


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_silu_equals_group_norm_then_silu(channels_last, affine, silu):
    norm = _norm(16, 4, affine)
    x = _input((2, 16, 6, 5), channels_last, offset=3.0)
    want = norm(x)
    want = F.silu(want) if silu else want
    got = GroupNormSiLU(norm, silu=silu)(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_group_moments_is_the_biased_mean_and_variance_of_each_group():
    x = _input((3, 8, 4, 4), offset=-2.0)
    mean, var = group_moments(x, 2)
    grouped = x.reshape(3, 2, -1)
    torch.testing.assert_close(mean, grouped.mean(-1))
    torch.testing.assert_close(var, grouped.var(-1, correction=0))


def test_fused_vae_decodes_like_the_plain_one_also_compiled():
    torch.manual_seed(0)
    vae = sd3_vae((8, 16), layers_per_block=1, norm_num_groups=4).eval()
    fused = sd3_vae((8, 16), layers_per_block=1, norm_num_groups=4).eval()
    fused.load_state_dict(vae.state_dict())
    # two resnets in the mid block, two per up block (layers_per_block + 1), and conv_norm_out
    assert fuse_vae_group_norms(fused) == 2 * (2 + 2 * 2) + 1
    latents = torch.randn(2, 16, 8, 8)
    with torch.inference_mode():
        want = vae.decode(latents).sample
        torch.testing.assert_close(fused.decode(latents).sample, want, rtol=1e-4, atol=1e-4)
        fused.decoder.compile(backend="aot_eager", dynamic=True)  # the custom op traces whole
        torch.testing.assert_close(fused.decode(latents).sample, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 128, 64, 48), (1, 512, 16, 16), (3, 256, 33, 17)])
def test_triton_moments_match_torch_on_cuda(shape, channels_last):
    x = _input(shape, channels_last, dtype=torch.bfloat16, offset=20.0, device="cuda")  # mean far above std
    mean, var = group_moments(x, 32)
    ref_var, ref_mean = torch.var_mean(x.float().reshape(shape[0], 32, -1), dim=-1, correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(var, ref_var, rtol=1e-3, atol=1e-5)
    norm = _norm(shape[1], 32).to("cuda", torch.bfloat16)
    got = GroupNormSiLU(norm, silu=True)(x).float()
    exact = torch.nn.GroupNorm(32, shape[1], eps=norm.eps).to("cuda", torch.float64)
    exact.load_state_dict({k: v.double() for k, v in norm.state_dict().items()})
    want = F.silu(exact(x.double())).float()
    # as close to the float64 result as torch's own bf16 GroupNorm + SiLU (bf16 roundings apart)
    ours, torchs = (got - want).abs(), (F.silu(norm(x)).float() - want).abs()
    assert ours.max() <= 1.5 * torchs.max() and ours.mean() <= 1.5 * torchs.mean()
