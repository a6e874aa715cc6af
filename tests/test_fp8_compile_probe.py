"""bench/fp8_compile_probe.py on the CPU: its variants name real settings, and its kernel table
sorts the H200's kernel names (call e11) into the right kinds."""

from __future__ import annotations

import pytest

from bench.fp8_compile_probe import INDUCTOR_OPTIONS, PRECISION_OF, VARIANTS, kernel_kind, main


@pytest.mark.parametrize(
    "name, kind",
    [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1", "attention"),
        ("nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_ovscale_bias_TNT", "gemm"),
        ("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_gelubias_TNN", "gemm"),
        # an activation's FP8 quantization, named by inductor after the ops it fused
        (
            "triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_t_unsqueeze_view_7",
            "triton (fused pointwise, norms, quantization)",
        ),
        ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::CUDAFunctor_add", "other"),
    ],
)
def test_kernel_kinds(name, kind):
    assert kernel_kind(name) == kind


def test_every_variant_names_a_precision_and_a_compile():
    for name in VARIANTS:
        precision, how, *tuning = name.split("-")
        assert precision in PRECISION_OF and how in ("dynamic", "static"), name
        assert tuning in ([], ["cdt"]) or (len(tuning) == 1 and tuning[0] in INDUCTOR_OPTIONS), name


def test_an_unknown_variant_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown variant 'fp9-dynamic'"):
        main(["--out", str(tmp_path / "probe.json"), "--variants", "fp9-dynamic"])
