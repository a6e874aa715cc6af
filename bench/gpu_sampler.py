"""The GPU's busy fraction over a window: NVML's utilisation (the share of time a kernel ran),
sampled on a thread. None where there is no NVIDIA GPU or no `pynvml` (CPU runs)."""

from __future__ import annotations

import threading


class GpuSampler:
    def __init__(self, interval_s: float = 0.2, device_index: int = 0) -> None:
        self.interval_s = interval_s
        self.device_index = device_index
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None

    def start(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception:  # no driver, no GPU or no pynvml: nothing to sample
            return
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import pynvml

        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0)
            except Exception:
                return

    def stop(self) -> float | None:
        """Stop sampling; the mean busy fraction, or None if nothing was sampled."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        return round(sum(self.samples) / len(self.samples), 4) if self.samples else None
