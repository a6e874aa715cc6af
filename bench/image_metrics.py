"""PSNR and SSIM between uint8 RGB images (numpy only)."""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of an HxW array (the kernel is symmetric)."""
    rows = sliding_window_view(img, kernel.size, axis=1) @ kernel
    return sliding_window_view(rows, kernel.size, axis=0) @ kernel


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over channels (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = _gaussian_kernel()
    scores = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = _filter(x, kernel), _filter(y, kernel)
        sxx = _filter(x * x, kernel) - mx * mx
        syy = _filter(y * y, kernel) - my * my
        sxy = _filter(x * y, kernel) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        scores.append(s.mean())
    return float(np.mean(scores))
