"""The FP8 precision mode on the CPU: which layers it picks (the tiny model, after QKV fusion),
its setting (SD3SERVE_PRECISION / --precision), and that every entry point refuses FP8 on a
machine without FP8 tensor cores or torchao, with a message naming what is missing."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from engine.config import EngineConfig
from engine.precision import PrecisionUnavailable, fp8_layer_names, is_fp8_linear, require_precision
from tests.entry_points import exit_status

CPU_REFUSAL = "precision fp8 needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9); the device is cpu"
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


@pytest.fixture(scope="module")
def fused_transformer(tiny_model_dir):
    from engine.fused_qkv import fuse_qkv
    from engine.loader import load_pipeline

    pipe = load_pipeline(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    fuse_qkv(pipe.transformer, split_queries=True)
    return pipe.transformer


def test_fp8_picks_the_block_linears_and_leaves_embedders_projection_and_adaln_in_bf16(fused_transformer):
    blocks = fused_transformer.transformer_blocks
    expected = set()
    for i, block in enumerate(blocks):
        names = ["attn.to_qkv", "attn.to_out.0", "ff.net.0.proj", "ff.net.2", "attn.to_added_qkv"]
        if not block.context_pre_only:  # the last block's text stream ends at its attention
            names += ["attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2"]
        expected |= {f"transformer_blocks.{i}.{n}" for n in names}
    picked = set(fp8_layer_names(fused_transformer))
    assert picked == expected
    all_linears = {n for n, m in fused_transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = all_linears - picked
    # every linear left in bf16 is an embedder, the final norm/projection or an adaLN modulation
    assert kept and all(
        n.split(".")[0] in ("pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out")
        or ".norm1.linear" in n
        or ".norm1_context.linear" in n
        for n in kept
    ), kept
    assert {
        "context_embedder",
        "proj_out",
        "norm_out.linear",
        "transformer_blocks.0.norm1.linear",
        "transformer_blocks.0.norm1_context.linear",
    } <= kept
    assert not any(
        n.startswith("transformer_blocks.0.attn.to_q") and n != "transformer_blocks.0.attn.to_qkv" for n in picked
    )  # applied after fusion: the fused projection, not the separate ones


def test_fp8_skips_linears_whose_gemm_dimensions_fp8_kernels_cannot_take():
    assert is_fp8_linear(torch.nn.Linear(32, 48), "transformer_blocks.3.ff.net.2")
    assert not is_fp8_linear(torch.nn.Linear(24, 48), "transformer_blocks.3.ff.net.2")
    assert not is_fp8_linear(torch.nn.Linear(32, 40), "transformer_blocks.3.ff.net.2")
    assert not is_fp8_linear(torch.nn.LayerNorm(32), "transformer_blocks.3.norm2")


def test_precision_setting_from_env_and_its_validation():
    assert EngineConfig().precision == "bf16"
    assert EngineConfig.from_env({"SD3SERVE_PRECISION": "fp8"}).precision == "fp8"
    with pytest.raises(ValueError, match="precision must be one of bf16, fp8, got 'int4'"):
        EngineConfig.from_env({"SD3SERVE_PRECISION": "int4"})


def test_require_precision_names_what_is_missing_on_the_cpu():
    require_precision("bf16", torch.device("cpu"))
    with pytest.raises(PrecisionUnavailable) as info:
        require_precision("fp8", torch.device("cpu"))
    message = str(info.value)
    assert CPU_REFUSAL in message and "--precision bf16" in message
    assert ("torchao" in message) == (not HAS_TORCHAO)


def test_engine_refuses_fp8_on_the_cpu(tiny_model_dir):
    from engine.engine import Engine
    from engine.loader import load_pipeline

    config = EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32", precision="fp8")
    with pytest.raises(PrecisionUnavailable, match="compute capability >= 8.9"):
        Engine(config, load_pipeline(config))


@pytest.fixture
def cli(monkeypatch, capsys):
    """`sd3serve <args>` in this process (each refusal here comes before any model or Redis)."""
    from sd3serve.cli import main

    # an unreachable Redis: the worker must refuse before it waits for one
    monkeypatch.setenv("SD3SERVE_REDIS_URL", "redis://127.0.0.1:1/0")

    def run(*args: str, env: dict | None = None) -> tuple[int, str]:
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        return exit_status(main, list(args), capsys)

    return run


@pytest.mark.parametrize("how", ["flag", "env"])
def test_worker_refuses_fp8_on_the_cpu_before_reaching_redis(how, cli):
    args = ["worker", "--device", "cpu", "--wait-for-redis", "30"]
    status, stderr = cli(*args, "--precision", "fp8") if how == "flag" else cli(*args, env={"SD3SERVE_PRECISION": "fp8"})
    assert status == 2, stderr[-2000:]
    assert f"error: {CPU_REFUSAL}" in stderr
    assert "Redis" not in stderr


def test_generate_refuses_fp8_on_the_cpu(tiny_model_dir, tmp_path, cli):
    out = tmp_path / "x.png"
    status, stderr = cli(
        "generate", "a red circle", "--model", str(tiny_model_dir), "--device", "cpu", "--precision", "fp8", "-o", str(out)
    )
    assert status == 2, stderr[-2000:]
    assert f"error: {CPU_REFUSAL}" in stderr
    assert not out.exists()


def test_the_fp8_quality_run_refuses_on_the_cpu(tmp_path, capsys):
    from bench.quality import main

    argv = ["--precision", "fp8", "--device", "cpu", "--limit", "2", "--out", str(tmp_path)]
    status, stderr = exit_status(main, argv, capsys)
    assert status != 0
    assert f"error: {CPU_REFUSAL}" in stderr
    assert not (tmp_path / "quality_fp8.json").exists()


def test_the_fp8_attention_quality_run_refuses_on_the_cpu_and_without_fp8(tmp_path, capsys):
    from bench.quality import main

    argv = ["--precision", "fp8", "--attention-precision", "fp8", "--device", "cpu", "--limit", "2", "--out", str(tmp_path)]
    status, stderr = exit_status(main, argv, capsys)
    assert status != 0 and f"error: {CPU_REFUSAL}" in stderr
    status, stderr = exit_status(main, ["--attention-precision", "fp8", "--device", "cpu", "--out", str(tmp_path)], capsys)
    assert status == 2 and "--attention-precision fp8 is measured against bf16 with --precision fp8" in stderr
    assert not list(tmp_path.iterdir())


def test_quantize_fp8_names_the_granularities_it_takes():
    from engine.precision import quantize_fp8

    with pytest.raises(ValueError, match="granularity must be one of row, tensor, got 'block'"):
        quantize_fp8(torch.nn.Linear(16, 16), granularity="block")


def test_the_fp8_mlps_sigmoid_form_gelu_is_diffusers_tanh_gelu(fused_transformer):
    from diffusers.models.activations import GELU

    from engine.precision import SigmoidFormGelu
    from engine.speed import fuse_gelu

    transformer = copy.deepcopy(fused_transformer)  # the fixture is shared by the module's tests
    gelus = [m for m in transformer.modules() if isinstance(m, GELU)]
    x = torch.randn(4, 7, gelus[0].proj.in_features) * 3
    expected = [gelu(x) for gelu in gelus]
    assert fuse_gelu(transformer, SigmoidFormGelu) == len(gelus) > 0
    swapped = [m for m in transformer.modules() if isinstance(m, SigmoidFormGelu)]
    assert [m.proj for m in swapped] == [g.proj for g in gelus]
    for module, want in zip(swapped, expected):
        torch.testing.assert_close(module(x), want, rtol=0, atol=2e-6)
    bf16 = SigmoidFormGelu(torch.nn.Linear(32, 64).bfloat16())
    xb = torch.randn(5, 32, dtype=torch.bfloat16)
    assert bf16(xb).dtype == torch.bfloat16


def test_only_fp8_blocks_compile_with_inductors_multi_kernel():
    from engine.precision import FP8_BLOCK_INDUCTOR_OPTIONS, block_inductor_options
    from engine.speed import compile_blocks

    assert block_inductor_options("fp8", "inductor", None) == FP8_BLOCK_INDUCTOR_OPTIONS
    assert block_inductor_options("bf16", "inductor", None) is None
    assert block_inductor_options("fp8", "inductor", "max-autotune") is None
    assert block_inductor_options("fp8", "aot_eager", None) is None
    with pytest.raises(ValueError, match="exclude each other"):
        compile_blocks(torch.nn.Module(), mode="max-autotune", inductor_options=FP8_BLOCK_INDUCTOR_OPTIONS)
