"""Host <-> device copies that do not synchronise the host with the device."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: through pinned memory and without a synchronisation on CUDA."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_host_pixels(images: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """`VaeImageProcessor.postprocess(images, "pil")`'s arithmetic, with the uint8 conversion on
    the device (a quarter of the bytes cross to the host, and the host does no float work).
    Returns (N, H, W, 3) uint8 host pixels and, on CUDA, the event after which they are valid."""
    images = (images * 0.5 + 0.5).clamp(0, 1)  # the processor's denormalize, in the model dtype
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    if pixels.device.type != "cuda":
        return pixels.contiguous(), None
    host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(pixels, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
