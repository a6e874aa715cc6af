"""The fast exact path: speed work on a loaded SD3 pipeline that keeps its results equal to the
eager pipeline within bf16 rounding.

- Fused Q/K/V (engine/fused_qkv.py): one projection for the image stream and one for the text
  stream of each joint attention (our own processor; diffusers' fused processor skips the q/k
  norms of SD3.5), and image and text queries attending to the joint keys in two SDPA calls,
  which saves the copies that join the queries and transpose the output (and lets the compiler
  drop the last block's unused text attention).
- SDPA kernel priority: cuDNN's fused attention first where the GPU has it (faster than the
  default FlashAttention-2 for head dim 64 on Hopper), applied only inside the transformer.
- Regional `torch.compile` of each transformer block with dynamic batch and sequence sizes: the
  blocks share one compiled graph, and a batch that grows step by step does not recompile.
  A step that uses the attention cache traces the cache's gathers, pool writes and merge into
  the same graph (engine/attention.py); only a step that grows a pool breaks it.
- The MLPs' first linear layer and its tanh-GELU as one cuBLASLt GEMM with a GELU epilogue
  (saves a read and a write of the 4x-wide hidden activations per block), behind a custom op
  so the compiler keeps it whole. Checked against tanh-GELU on the device before use.
- Regional compile of the text encoders' layers (engine/text_speed.py): T5-XXL encodes 16
  prompts in 79 ms instead of 134 on an H100; new requests wait for it in their first step.
- CUDA graphs of small forwards, exact and cached steps (engine/graphs.py; the runner replays them), on CUDA.
- A compiled VAE decoder (dynamic shapes) whose GroupNorm statistics come from our own split
  reduction (engine/group_norm.py; the compiler fuses the normalisation, SiLU and layout changes
  around it): 85.6 ms eager -> 45.9 compiled -> 28.2 ms with the kernel per 1024² image on an
  H100. A channels-last VAE (`vae_compile_how`) is not faster, eager or compiled.

- FP8 precision (`precision="fp8"`, engine/precision.py): the blocks' linears as torchao float8
  GEMMs, applied after QKV fusion and before compile, so compile, CUDA graphs and the attention
  cache run over the FP8 layers; instead of the bf16 GELU epilogue the MLPs' GELU takes its
  sigmoid form, and the blocks compile with inductor's multi-kernel (one-pass quantizations).
- FP8 attention (`attention_precision="fp8"`, engine/fp8_attention.py; a config's `auto` means it
  with FP8 linears where it can run):
  the fused processor's SDPA calls become per-head FP8 Q/K/V into FlashAttention-3's FP8 forward
  (Hopper only). It implies fused Q/K/V (the strategy lives in `FusedJointProcessor`), and the
  attention cache wraps that processor, so FRESH rows of cached steps take it too.

`apply_speed(pipe, options)` must run before the attention cache wraps the processors.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from engine.fp8_attention import attention_strategy, resolve_attention_precision
from engine.fused_qkv import fuse_qkv

log = logging.getLogger(__name__)

SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
FAST_SDPA = ("cudnn", "flash", "efficient", "math")
# How the VAE decoder compiles: as one graph, the same in channels-last layout, or each resnet,
# upsampler and attention on its own (shorter compile, no fusion across them).
VAE_COMPILES = ("whole", "whole_channels_last", "regional")


@dataclass(frozen=True)
class SpeedOptions:
    compile: bool = False  # regional torch.compile of the transformer blocks
    fuse_qkv: bool = False
    # Image and text queries in two SDPA calls (FusedJointProcessor): one forward 1.9 % faster at
    # 1024² with 16 rows and 1.8 % at 512² with 32 on an H100, bitwise equal output.
    split_queries: bool = False
    sdpa: tuple[str, ...] = ()  # SDPA backends in priority order; () keeps torch's default
    gelu_epilogue: bool = False
    vae_compile: bool = False  # 1.9x faster 1024² decode on an H100; about a minute of compiling once
    vae_compile_how: str = "whole"  # one of VAE_COMPILES (its channels-last variant: slower eagerly, even compiled)
    # The decoder's GroupNorm statistics from our kernel (engine/group_norm.py): with the compiled
    # decoder, 45.9 -> 28.2 ms per 1024² image on an H100 (batch 4).
    vae_group_norm: bool = False
    text_compile: bool = False  # regional compile of the text encoders (engine/text_speed.py)
    cuda_graphs: bool = False  # replay small forwards, exact and cached, as CUDA graphs (engine/graphs.py)
    graph_max_tokens: int = 8192  # ... of at most this many image tokens: 8 rows at 512², 2 at 1024²
    precision: str = "bf16"  # fp8: the blocks' linears as FP8 GEMMs (engine/precision.py)
    attention_precision: str = "bf16"  # fp8: FP8 attention through FA3 (engine/fp8_attention.py)
    backend: str = "inductor"  # torch.compile backend ("aot_eager" / "eager" for tests)
    mode: str | None = None  # torch.compile mode

    @classmethod
    def fast(cls, **overrides) -> "SpeedOptions":
        values: dict[str, Any] = dict(
            compile=True,
            fuse_qkv=True,
            split_queries=True,
            sdpa=FAST_SDPA,
            gelu_epilogue=True,
            vae_compile=True,
            vae_group_norm=True,
            text_compile=True,
            cuda_graphs=True,
        )
        values.update(overrides)
        return cls(**values)

    @property
    def any(self) -> bool:
        return any(
            (
                self.compile,
                self.fuse_qkv,
                bool(self.sdpa),
                self.gelu_epilogue,
                self.vae_compile,
                self.cuda_graphs,
                self.vae_group_norm,
                self.text_compile,
                self.precision != "bf16",
                self.attention_precision != "bf16",
            )
        )


def speed_options_for(config, device: torch.device) -> SpeedOptions:
    """The engine's choice: everything on when `config.compile` is on (auto: on CUDA), in the
    config's precision and attention precision (`auto` resolved for this device)."""
    precision: str = getattr(config, "precision", "bf16")
    attention_precision = resolve_attention_precision(precision, getattr(config, "attention_precision", "auto"), device)
    if config.compile_enabled(device.type):
        return SpeedOptions.fast(precision=precision, attention_precision=attention_precision)
    return SpeedOptions(precision=precision, attention_precision=attention_precision)


@torch.library.custom_op("sd3serve::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x @ weight.T + bias, approximate="tanh"); on CUDA one cuBLASLt GEMM with a GELU epilogue."""
    flat = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
    else:
        out = F.gelu(torch.addmm(bias, flat, weight.t()), approximate="tanh")
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class LinearGeluTanh(torch.nn.Module):
    """Drop-in for diffusers' `GELU(approximate="tanh")` projection module."""

    def __init__(self, proj: torch.nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return linear_gelu_tanh(hidden_states, self.proj.weight, self.proj.bias)


def gelu_epilogue_is_tanh(device: torch.device) -> bool:
    """The fused epilogue must compute diffusers' tanh-GELU, not the erf form: checked in float32
    (where the two differ by up to ~4e-4, far above float32 GEMM rounding) on pre-activations
    of unit scale."""
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(64, 256, generator=g).to(device)
    w = (torch.randn(512, 256, generator=g) / 16).to(device)
    b = torch.randn(512, generator=g).to(device)
    fused = linear_gelu_tanh(x, w, b)
    plain = torch.addmm(b, x, w.t())
    to_tanh = (fused - F.gelu(plain, approximate="tanh")).abs().max().item()
    to_erf = (fused - F.gelu(plain)).abs().max().item()
    return to_tanh < 1e-4 and to_tanh * 10 < to_erf


def fuse_gelu(transformer: torch.nn.Module, replacement: Callable[[torch.nn.Linear], torch.nn.Module] = LinearGeluTanh) -> int:
    """Replace each tanh-GELU projection (diffusers `GELU` with bias) by `replacement(proj)`."""
    from diffusers.models.activations import GELU

    fused = 0
    for module in transformer.modules():
        net = getattr(module, "net", None)
        if isinstance(net, torch.nn.ModuleList) and net and isinstance(net[0], GELU):
            gelu = net[0]
            if gelu.approximate == "tanh" and gelu.proj.bias is not None:
                net[0] = replacement(gelu.proj)
                fused += 1
    return fused


def sdpa_priority(names: tuple[str, ...]):
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, SDPA_BACKENDS[name]) for name in names]


def prefer_sdpa(transformer: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Run the transformer's forward under an SDPA kernel priority (other models keep torch's)."""
    from torch.nn.attention import sdpa_kernel

    backends = sdpa_priority(names)
    forward = transformer.forward

    @functools.wraps(forward)
    def with_priority(*args, **kwargs):
        with sdpa_kernel(backends, set_priority=True):
            return forward(*args, **kwargs)

    transformer.forward = with_priority


def compile_blocks(
    transformer: torch.nn.Module,
    backend: str = "inductor",
    mode: str | None = None,
    inductor_options: dict[str, Any] | None = None,
) -> int:
    """Regional compile: each transformer block with dynamic shapes (batch and tokens), so the
    identical blocks share one graph and batch growth causes no recompiles. `inductor_options`
    apply to these graphs only (torch.compile takes them instead of a mode)."""
    if inductor_options and mode is not None:
        raise ValueError(f"compile mode {mode!r} and inductor options {inductor_options} exclude each other")
    # Block variants (last block, exact vs cached steps) are separate cache entries of one code object.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    # Sizes that happen to be equal when a graph is traced (rows of a batch and of a cache pool,
    # say) must not be assumed equal, or the next step recompiles.
    torch.fx.experimental._config.use_duck_shape = False
    blocks = list(getattr(transformer, "transformer_blocks", []))
    for block in blocks:
        if inductor_options:
            block.compile(backend=backend, dynamic=True, options=dict(inductor_options))
        else:
            block.compile(backend=backend, mode=mode, dynamic=True)
    return len(blocks)


def compile_vae(vae: Any, how: str, backend: str = "inductor", mode: str | None = None) -> None:
    """Compile the VAE decoder (dynamic shapes: chunks of 1..4 images and every size share it)."""
    if how not in VAE_COMPILES:
        raise ValueError(f"unknown VAE compile {how!r}; choose from {', '.join(VAE_COMPILES)}")
    if how.endswith("channels_last"):
        vae.to(memory_format=torch.channels_last)
    if how == "regional":
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.upsampling import Upsample2D

        for module in vae.decoder.modules():
            if isinstance(module, (ResnetBlock2D, Upsample2D, Attention)):
                module.compile(backend=backend, mode=mode, dynamic=True)
    else:
        vae.decoder.compile(backend=backend, mode=mode, dynamic=True)


def apply_speed(pipe, options: SpeedOptions) -> dict:
    """Apply `options` to `pipe` in place; returns what was done (for logs and benchmarks)."""
    done: dict = {}
    if not options.any:
        return done
    transformer = pipe.transformer
    attend = None
    if options.attention_precision != "bf16":  # refuses here, before any weights change
        attend = attention_strategy(options.attention_precision, next(transformer.parameters()).device)
        done["attention_precision"] = options.attention_precision
    if options.fuse_qkv or attend is not None:
        done["fused_attention_modules"] = fuse_qkv(transformer, options.split_queries, attend)
        done["split_queries"] = options.split_queries
    if options.precision == "fp8":  # after QKV fusion, before the GELU epilogue and compile
        from engine.precision import quantize_fp8

        done["fp8_linears"] = quantize_fp8(transformer)
    if options.sdpa:
        prefer_sdpa(transformer, options.sdpa)
        done["sdpa"] = list(options.sdpa)
    if options.gelu_epilogue and options.precision == "fp8":
        from engine.precision import SigmoidFormGelu

        # The MLPs' first GEMM runs in FP8, so no bf16 GELU epilogue: the GELU is fused into the
        # quantization of its output instead, written in its cheaper form.
        done["gelu_sigmoid_form"] = fuse_gelu(transformer, SigmoidFormGelu)
    elif options.gelu_epilogue:
        if gelu_epilogue_is_tanh(next(transformer.parameters()).device):
            done["gelu_epilogues"] = fuse_gelu(transformer)
        else:
            log.warning("the GEMM's GELU epilogue is not tanh-GELU on this device; left off")
    if options.compile:
        from engine.precision import block_inductor_options

        inductor_options = block_inductor_options(options.precision, options.backend, options.mode)
        done["compiled_blocks"] = compile_blocks(transformer, options.backend, options.mode, inductor_options)
        if inductor_options:
            done["block_inductor_options"] = inductor_options
    if options.text_compile:
        from engine.text_speed import compile_text_encoders

        done["text_compiled_layers"] = compile_text_encoders(pipe, options.backend, options.mode)
    if options.vae_group_norm and pipe.vae is not None:
        from engine.group_norm import fuse_vae_group_norms

        done["vae_group_norms"] = fuse_vae_group_norms(pipe.vae)
    if options.vae_compile and pipe.vae is not None:
        compile_vae(pipe.vae, options.vae_compile_how, options.backend, options.mode)
        done["vae_compiled"] = options.vae_compile_how
    log.info("speed work applied: %s", done)
    return done
