"""Prometheus metrics exported by a worker process on its own HTTP port.

Torch-free on purpose: `sample_gpu_memory()` imports torch only when it is called, so the
definitions can be imported (and checked by tests) anywhere.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# A diffusion job takes from ~0.5 s (tiny model, few steps) to minutes (large batch, 1024², queue).
LATENCY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
# Waiting in the queue: from immediate pickup to a long backlog.
QUEUE_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# One denoising step of the whole running batch: ~5 ms (small batch, fast GPU) to seconds (CPU).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 2.5, 5.0, 10.0)
# Running requests in one step (each request is two rows with CFG).
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

JOBS_COMPLETED = Counter(
    "sd3serve_jobs_completed_total",
    "Jobs this worker finished, by status: succeeded, failed, canceled, or retried (a failed attempt RQ will re-run).",
    ["status"],
)
IMAGES_GENERATED = Counter(
    "sd3serve_images_generated_total",
    "Images generated and stored by this worker.",
)
QUEUE_WAIT = Histogram(
    "sd3serve_queue_wait_seconds",
    "Time from enqueue to the job joining a running batch.",
    buckets=QUEUE_WAIT_BUCKETS,
)
JOB_LATENCY = Histogram(
    "sd3serve_job_latency_seconds",
    "End-to-end time of a finished job, from enqueue to its image being stored.",
    buckets=LATENCY_BUCKETS,
)
STEP_DURATION = Histogram(
    "sd3serve_step_duration_seconds",
    "Wall time of one engine step (one denoising step of every running request).",
    buckets=STEP_BUCKETS,
)
DEVICE_SECONDS = Counter(
    "sd3serve_device_seconds_total",
    "Device time of the engine's steps (CUDA events on a GPU, the host clock on the CPU); "
    "its rate is the share of time the device ran steps.",
)
BATCH_SIZE = Histogram(
    "sd3serve_batch_size",
    "Requests in the running batch at each engine step.",
    buckets=BATCH_BUCKETS,
)
RUNNING_REQUESTS = Gauge(
    "sd3serve_running_requests",
    "Requests currently in this worker's running batch.",
)
FRESH_RATIO = Gauge(
    "sd3serve_attention_fresh_ratio",
    "Fraction of running requests that computed attention (FRESH) in the last step; 1 = no caching.",
)
CACHE_BYTES = Gauge(
    "sd3serve_attention_cache_bytes",
    "Memory held by the attention cache of the running requests.",
)
CACHE_ALLOCATED_BYTES = Gauge(
    "sd3serve_attention_cache_allocated_bytes",
    "Memory of the attention cache's pools: free slots and idle image sizes (kept for their CUDA graphs) included.",
)
GPU_MEMORY = Gauge(
    "sd3serve_gpu_memory_bytes",
    "GPU memory allocated by torch on this worker's device (0 on CPU).",
)


@dataclass
class MetricsServer:
    """Handle on a running metrics HTTP server; `port` is the bound port (useful with port 0)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Serve `/metrics` on `addr:port` from a daemon thread (port 0 picks a free port)."""
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread)


def sample_gpu_memory() -> None:
    """Set GPU_MEMORY from torch's allocator (call it once per step or so; it is cheap)."""
    import torch

    GPU_MEMORY.set(torch.cuda.memory_allocated() if torch.cuda.is_available() else 0)
