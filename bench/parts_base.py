"""What the part mixins of `Bench` (bench/engine_bench.py) read from it, declared once for the
type checker. Annotations only: nothing here exists at run time, so no mixin shadows another's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from bench.results_file import Results
    from engine.speed import SpeedOptions


class BenchParts:
    args: Any  # the command line (argparse.Namespace)
    device: torch.device
    dtype: torch.dtype
    dtype_name: str
    model: str  # shape name of the main model ("sd3-medium", or "tiny" in a smoke run)
    large: str  # shape name of the large model
    fast: SpeedOptions
    results: Results
    pipe: Any  # the diffusers pipeline, once built
    engine_fast: Any  # the fast engine, once built

    if TYPE_CHECKING:

        def reps(self, batch: int) -> int: ...

        def note_flops(self, pipe: Any, model: str) -> None: ...

        def cache_memory(self, engine: Any, model: str) -> dict: ...

        def engine_rows(self, engine: Any, exact_mode: str, cached_mode: str, **extra: Any) -> None: ...

        def exact_rows(self, engine: Any, exact_mode: str, **extra: Any) -> None: ...

        def cached_rows(self, engine: Any, cached_mode: str, **extra: Any) -> None: ...

        def accuracy_requests(self, size: int) -> list: ...

        eager_latents: dict
        diffusers_latents: dict
