"""Whole-batch augmentation and normalisation on the device (no DataLoader workers, no PIL).

The training path keeps uint8 images on the device and, per batch: gathers the batch, applies a random
crop with zero padding and a horizontal flip to all images at once, then normalises. Randomness comes
from an explicit `torch.Generator`, so a seed reproduces the same augmentations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop (zero padding `pad`) and horizontal flip of a uint8 batch (N, C, H, W), same shape out.

    Matches torchvision's RandomCrop(H, padding=pad) + RandomHorizontalFlip on images: padding is black
    (0) before normalisation, offsets are uniform in [0, 2*pad] per image, each image flips with p = 0.5.
    """
    n, c, h, w = x.shape
    dev = x.device
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        offs = torch.randint(0, 2 * pad + 1, (2, n), device=dev, generator=generator)
        rows = (offs[0, :, None] + torch.arange(h, device=dev))[:, :, None]   # (N, H, 1)
        cols = (offs[1, :, None] + torch.arange(w, device=dev))[:, None, :]   # (N, 1, W)
        batch = torch.arange(n, device=dev)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (N, C, H, W)
    if flip:
        flips = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
    return x


class Normalizer:
    """uint8 (N, 3, H, W) -> float, (x / 255 - mean) / std, optionally channels-last and another dtype."""

    def __init__(self, mean, std, device, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(self.shift, x.float(), self.scale)
        return out.to(dtype=self.dtype, memory_format=self.memory_format)


def make_generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed)
    return g
