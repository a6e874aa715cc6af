"""The fast exact path: speed work on a loaded SD3 pipeline that keeps its results equal to the
eager pipeline within bf16 rounding.

- Fused Q/K/V: one projection for the image stream and one for the text stream of each joint
  attention (our own processor; diffusers' fused processor skips the q/k norms of SD3.5), and
  image and text queries attending to the joint keys in two SDPA calls, which saves the copies
  that join the queries and transpose the output (and lets the compiler drop the last block's
  unused text attention).
- SDPA kernel priority: cuDNN's fused attention first where the GPU has it (faster than the
  default FlashAttention-2 for head dim 64 on Hopper), applied only inside the transformer.
- Regional `torch.compile` of each transformer block with dynamic batch and sequence sizes: the
  blocks share one compiled graph, and a batch that grows step by step does not recompile.
  A step that uses the attention cache traces the cache's gathers, pool writes and merge into
  the same graph (engine/attention.py); only a step that grows a pool breaks it.
- The MLPs' first linear layer and its tanh-GELU as one cuBLASLt GEMM with a GELU epilogue
  (saves a read and a write of the 4x-wide hidden activations per block), behind a custom op
  so the compiler keeps it whole. Checked against tanh-GELU on the device before use.
- CUDA graphs of small forwards, exact and cached steps (engine/graphs.py; the runner replays them), on CUDA.
- A compiled VAE decoder (dynamic shapes) whose GroupNorm statistics come from our own split
  reduction (engine/group_norm.py; the compiler fuses the normalisation, SiLU and layout changes
  around it): 85.6 ms eager -> 45.9 compiled -> 28.2 ms with the kernel per 1024² image on an
  H100. A channels-last VAE is optional and off (not faster once compiled).

`apply_speed(pipe, options)` must run before the attention cache wraps the processors.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    vae_channels_last: bool = False  # measured slower on an H100 (142 vs 91 ms per 1024² decode)
    vae_compile: bool = False  # 1.9x faster 1024² decode on an H100; about 2.5 min of compiling once
    vae_compile_how: str = "whole"  # one of VAE_COMPILES
    # The decoder's GroupNorm statistics from our kernel (engine/group_norm.py): with the compiled
    # decoder, 45.9 -> 28.2 ms per 1024² image on an H100 (batch 4).
    vae_group_norm: bool = False
    cuda_graphs: bool = False  # replay small exact forwards as CUDA graphs (engine/graphs.py)
    graph_max_tokens: int = 8192  # ... of at most this many image tokens: 8 rows at 512², 2 at 1024²
    backend: str = "inductor"  # torch.compile backend ("aot_eager" / "eager" for tests)
    mode: str | None = None  # torch.compile mode

    @classmethod
    def fast(cls, **overrides) -> "SpeedOptions":
        values = dict(compile=True, fuse_qkv=True, split_queries=True, sdpa=FAST_SDPA, gelu_epilogue=True,
                      vae_compile=True, vae_group_norm=True, cuda_graphs=True)
        values.update(overrides)
        return cls(**values)

    @property
    def any(self) -> bool:
        return any((self.compile, self.fuse_qkv, bool(self.sdpa), self.gelu_epilogue, self.vae_channels_last,
                    self.vae_compile, self.cuda_graphs, self.vae_group_norm))


def speed_options_for(config, device: torch.device) -> SpeedOptions:
    """The engine's choice: everything on when `config.compile` is on (auto: on CUDA)."""
    return SpeedOptions.fast() if config.compile_enabled(device.type) else SpeedOptions()


class FusedJointProcessor:
    """Joint attention with fused projections: `to_qkv` for the image stream and `to_added_qkv`
    for the text stream. Same math as diffusers' `JointAttnProcessor2_0` (q/k norms included),
    one GEMM per stream instead of three.

    With `split_queries` the image and the text queries attend to the joint keys and values in two
    SDPA calls instead of one over concatenated queries: the same rows of softmax(QKᵀ)V, without
    the copy that joins the queries, and each output comes out in the (batch, tokens, heads, dim)
    order of its queries, so the output projections read it without a transposing copy."""

    def __init__(self, split_queries: bool = False) -> None:
        self.split_queries = split_queries

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, image_tokens, _ = hidden_states.shape
        heads = attn.heads
        q, k, v = self._project(attn.to_qkv, hidden_states, heads, attn.norm_q, attn.norm_k)
        if encoder_hidden_states is None:
            image = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
            return attn.to_out[1](attn.to_out[0](self._merge_heads(image, q.dtype)))
        cq, ck, cv = self._project(
            attn.to_added_qkv, encoder_hidden_states, heads, attn.norm_added_q, attn.norm_added_k
        )
        k, v = torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        if self.split_queries:
            image = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
            text = F.scaled_dot_product_attention(cq, k, v, dropout_p=0.0, is_causal=False)
        else:
            out = F.scaled_dot_product_attention(torch.cat([q, cq], dim=2), k, v, dropout_p=0.0, is_causal=False)
            image, text = out[:, :, :image_tokens], out[:, :, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](self._merge_heads(image, q.dtype)))
        text = self._merge_heads(text, q.dtype)
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text

    @staticmethod
    def _merge_heads(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        batch, heads, tokens, dim = out.shape
        return out.transpose(1, 2).reshape(batch, tokens, heads * dim).to(dtype)

    @staticmethod
    def _project(linear, x, heads, norm_q, norm_k):
        batch, tokens, _ = x.shape
        qkv = linear(x).view(batch, tokens, 3, heads, -1).transpose(1, 3)  # (batch, heads, 3, tokens, dim)
        q, k, v = qkv.unbind(2)
        if norm_q is not None:
            q = norm_q(q)
        if norm_k is not None:
            k = norm_k(k)
        return q, k, v


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


def fuse_gelu(transformer: torch.nn.Module) -> int:
    """Replace each tanh-GELU projection (diffusers `GELU` with bias) by `LinearGeluTanh`."""
    from diffusers.models.activations import GELU

    fused = 0
    for module in transformer.modules():
        net = getattr(module, "net", None)
        if isinstance(net, torch.nn.ModuleList) and net and isinstance(net[0], GELU):
            gelu = net[0]
            if gelu.approximate == "tanh" and gelu.proj.bias is not None:
                net[0] = LinearGeluTanh(gelu.proj)
                fused += 1
    return fused


def _attention_modules(transformer: torch.nn.Module):
    return [m for m in transformer.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]


@torch.no_grad()
def fuse_qkv(transformer: torch.nn.Module, split_queries: bool = False) -> int:
    """Fuse each attention's Q/K/V weights (and the text stream's) into one linear layer, drop
    the separate ones, and install `FusedJointProcessor`. Returns the modules fused."""
    fused = 0
    for attn in _attention_modules(transformer):
        if getattr(attn, "to_qkv", None) is not None or attn.is_cross_attention:
            continue
        attn.to_qkv = _concat_linears([attn.to_q, attn.to_k, attn.to_v])
        del attn.to_q, attn.to_k, attn.to_v
        if getattr(attn, "add_q_proj", None) is not None:
            attn.to_added_qkv = _concat_linears([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj])
            del attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
        attn.fused_projections = True
        attn.set_processor(FusedJointProcessor(split_queries))
        fused += 1
    return fused


def _concat_linears(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    first = linears[0]
    out = torch.nn.Linear(
        first.in_features,
        sum(lin.out_features for lin in linears),
        bias=first.bias is not None,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    out.weight.copy_(torch.cat([lin.weight for lin in linears]))
    if first.bias is not None:
        out.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return out.requires_grad_(False)


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


def compile_blocks(transformer: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Regional compile: each transformer block with dynamic shapes (batch and tokens), so the
    identical blocks share one graph and batch growth causes no recompiles."""
    # Block variants (last block, exact vs cached steps) are separate cache entries of one code object.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    # Sizes that happen to be equal when a graph is traced (rows of a batch and of a cache pool,
    # say) must not be assumed equal, or the next step recompiles.
    torch.fx.experimental._config.use_duck_shape = False
    blocks = list(getattr(transformer, "transformer_blocks", []))
    for block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=True)
    return len(blocks)


def compile_vae(vae: torch.nn.Module, how: str, backend: str = "inductor", mode: str | None = None) -> None:
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
    if options.fuse_qkv:
        done["fused_attention_modules"] = fuse_qkv(transformer, options.split_queries)
        done["split_queries"] = options.split_queries
    if options.sdpa:
        prefer_sdpa(transformer, options.sdpa)
        done["sdpa"] = list(options.sdpa)
    if options.gelu_epilogue:
        if gelu_epilogue_is_tanh(next(transformer.parameters()).device):
            done["gelu_epilogues"] = fuse_gelu(transformer)
        else:
            log.warning("the GEMM's GELU epilogue is not tanh-GELU on this device; left off")
    if options.compile:
        done["compiled_blocks"] = compile_blocks(transformer, options.backend, options.mode)
        transformer._sd3serve_compile = (options.backend, options.mode)
    if options.vae_channels_last and pipe.vae is not None:
        pipe.vae.to(memory_format=torch.channels_last)
        done["vae_channels_last"] = True
    if options.vae_group_norm and pipe.vae is not None:
        from engine.group_norm import fuse_vae_group_norms

        done["vae_group_norms"] = fuse_vae_group_norms(pipe.vae)
    if options.vae_compile and pipe.vae is not None:
        compile_vae(pipe.vae, options.vae_compile_how, options.backend, options.mode)
        done["vae_compiled"] = options.vae_compile_how
    log.info("speed work applied: %s", done)
    return done
