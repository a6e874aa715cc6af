"""bench/fp8_quant_kernels.py on the CPU: its cheaper formulations compute the engine's numbers,
and it refuses to run without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.fp8_quant_kernels import HEAD_CASES, ROW_CASES, main


def test_the_two_per_head_quantizations_are_bitwise_equal():
    qkv = torch.randn(2, 48, 3 * 24 * 64, dtype=torch.bfloat16) * 4
    q = qkv[..., : 24 * 64].view(2, 48, 24, 64).transpose(1, 2)
    (one8, one_descale), (two8, two_descale) = (case(q) for case in HEAD_CASES.values())
    assert torch.equal(one_descale, two_descale)
    assert torch.equal(one8.view(torch.uint8), two8.view(torch.uint8))


def test_the_sigmoid_form_quantizes_like_the_tanh_gelu():
    x = torch.randn(64, 6144) * 3
    (tanh8, tanh_scale), (sigmoid8, sigmoid_scale) = ROW_CASES["gelu_quant_tanh"](x), ROW_CASES["gelu_quant_sigmoid"](x)
    torch.testing.assert_close(sigmoid_scale, tanh_scale, rtol=1e-6, atol=0)
    dequantized = sigmoid8.float() * sigmoid_scale
    torch.testing.assert_close(dequantized, F.gelu(x, approximate="tanh"), rtol=0.07, atol=float(tanh_scale.max()))
    assert (sigmoid8.float() != tanh8.float()).float().mean() < 1e-3


def test_it_refuses_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="run it on the GPU machine"):
        main(["--out", str(tmp_path / "k.json")])
