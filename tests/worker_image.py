"""What the worker image (deploy/Dockerfile.worker) sets, for the compose and Kubernetes tests."""

from __future__ import annotations

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "deploy" / "Dockerfile.worker"


def compile_cache_dirs() -> set[str]:
    """The directories of torch.compile's and Triton's caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR)."""
    return set(re.findall(r"(?:TORCHINDUCTOR|TRITON)_CACHE_DIR=(\S+)", DOCKERFILE.read_text()))
