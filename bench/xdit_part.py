"""The `xdit` part of bench/engine_bench.py's `Bench`: xDiT (PyPI `xfuser` 0.7.0) as its users run
it on one GPU, eager (`xdit`) and with its `use_torch_compile` option (`xdit-compile`).

`xFuserStableDiffusion3Pipeline(pipeline, engine_config)` wraps a diffusers pipeline built from the
same components as the bench's random-weight pipeline (same modules, same weights), in one
process with the distributed environment of a world of one (RANK 0, WORLD_SIZE 1, NCCL). With no
parallelism configured xDiT takes its "naive" path: the wrapped pipeline's own `__call__`, with
xDiT's scheduler wrapper, and with `use_torch_compile` its `torch.compile(transformer.forward)`
(default mode, graph breaks allowed). `prepare_run` is not used (it needs real tokenizers): each
measured (size, batch) is first run once untimed instead (`compile_seconds` in the compiled rows).

xfuser 0.7.0 imports only on a machine with an accelerator: on a CPU-only torch its import raises
NotImplementedError("No Accelerators ... available") (xfuser/envs.py, `get_device_version`).
flash-attn, yunchang's flash kernels and the `av`/`beautifulsoup4` requirements are optional for
this path: xfuser probes flash-attn in try blocks and the SD3 path imports neither.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from typing import Any

import torch

from bench.diffusers_compiled import _allow_recompiles
from bench.parts_base import BenchParts
from bench.runs import requests, row, run_diffusers

log = logging.getLogger("bench")
XFUSER_VERSION = "0.7.0"
SYSTEMS = (("xdit", "eager", False), ("xdit-compile", "compiled", True))
WHEELS = "xfuser-0.7.0, distvae-0.1.0, yunchang-0.6.4 and einops wheels in .whl (bench/device_setup.sh installs them --no-deps)"


class XditUnavailable(RuntimeError):
    """xDiT cannot run here."""


def import_xfuser() -> Any:
    """The `xfuser` module, or a clear refusal."""
    if not torch.cuda.is_available():
        raise XditUnavailable(
            "xDiT (xfuser 0.7.0) needs a CUDA GPU: on a CPU-only torch its import raises "
            "NotImplementedError('No Accelerators ... available')"
        )
    try:
        import xfuser
    except ImportError as exc:
        raise XditUnavailable(f"xDiT is not installed ({exc}); needs the {WHEELS}") from None
    version = getattr(xfuser, "__version__", None) or _dist_version("xfuser")
    if version != XFUSER_VERSION:
        log.warning("xfuser %s, not the %s this part was written against", version, XFUSER_VERSION)
    return xfuser


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_environment() -> dict[str, str]:
    """The variables torch.distributed's env:// rendezvous reads, for a world of one on this host
    (kept where the caller set them already)."""
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in env}


def xdit_pipeline(xfuser: Any, pipe, use_torch_compile: bool):
    """xDiT's SD3 wrapper around a pipeline sharing `pipe`'s modules (so `pipe` keeps its own
    scheduler and config)."""
    engine_config, _ = xfuser.xFuserArgs(model="random-weights", use_torch_compile=use_torch_compile).create_config()
    view = type(pipe)(**pipe.components)
    view.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    wrapped = xfuser.xFuserStableDiffusion3Pipeline(view, engine_config)
    if not wrapped.use_naive_forward():
        raise XditUnavailable("xDiT did not take its single-GPU path (is WORLD_SIZE > 1?)")
    return wrapped


@contextmanager
def restored_transformer(transformer: torch.nn.Module):
    """xDiT's compile sets `transformer.forward` on the module itself: take it off afterwards."""
    try:
        yield
    finally:
        transformer.__dict__.pop("forward", None)


class XditPart(BenchParts):
    """Mixed into `Bench`; runs after the diffusers rows, before any engine wraps the pipeline."""

    def xdit_part(self) -> None:
        a = self.args
        xfuser = import_xfuser()
        env = single_process_environment()
        compile_seconds: dict[str, float] = {}
        _allow_recompiles()
        try:
            for system, mode, compiled in SYSTEMS:
                if compiled and a.no_xdit_compile:
                    continue
                with restored_transformer(self.pipe.transformer):
                    wrapped = xdit_pipeline(xfuser, self.pipe, compiled)
                    self._rows(wrapped, system, mode, compiled, compile_seconds)
                del wrapped
                torch._dynamo.reset()
        finally:
            self.results.note(
                "xdit",
                dict(
                    xfuser=_dist_version("xfuser"),
                    distributed_env=env,
                    path="naive (single GPU: the pipeline's own __call__)",
                    compile="xFuserArgs(use_torch_compile=True): torch.compile(transformer.forward), default mode",
                    warmup_seconds_per_shape=compile_seconds,
                ),
            )
            self._destroy_distributed()

    def _rows(self, wrapped, system: str, mode: str, compiled: bool, compile_seconds: dict[str, float]) -> None:
        a = self.args
        for size in a.sizes:
            for batch in a.batches:
                warm, _ = run_diffusers(wrapped, self.device, requests("xw", batch, size, 2))
                extra: dict = {}
                if compiled:
                    compile_seconds[f"{size}_b{batch}"] = round(warm.seconds, 2)
                    extra["compile_seconds"] = compile_seconds[f"{size}_b{batch}"]
                log.info("%s %d² batch %d: warm-up %.1f s", system, size, batch, warm.seconds)
                for rep in range(self.reps(batch)):
                    run, _ = run_diffusers(wrapped, self.device, requests(f"x{rep}", batch, size, a.steps))
                    self.results.add("engine", row(system, mode, self.model, size, batch, a.steps, run, rep=rep, **extra))

    @staticmethod
    def _destroy_distributed() -> None:
        from xfuser.core.distributed import get_runtime_state

        try:
            get_runtime_state().destroy_distributed_env()
        except AssertionError:  # never initialised (the first wrapper failed)
            pass
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
