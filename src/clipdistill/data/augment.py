"""Batched geometric augmentation on in-memory tensors.

One ``grid_sample`` call per batch replaces per-image PIL transforms, which matters on two
CPU cores. Only scale and translation: flips would turn a "left arrow" into a right one and
colour jitter would change "red heart" into another emoji, so both are deliberately absent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_scale_translate(
    unit_pixels: torch.Tensor,
    *,
    scale: tuple[float, float] = (0.8, 1.0),
    max_shift: float = 0.1,
    generator: torch.Generator | None = None,
    fill: float = 1.0,
) -> torch.Tensor:
    """Zoom each image by a random factor in ``scale`` (<1 zooms in) and shift it by up to
    ``max_shift`` of its size; pixels pulled in from outside are ``fill`` (white)."""
    batch = unit_pixels.shape[0]
    device = unit_pixels.device
    low, high = scale
    zoom = torch.empty(batch).uniform_(low, high, generator=generator).to(device)
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1).to(device) * max_shift * 2
    theta = torch.zeros(batch, 2, 3, device=device, dtype=unit_pixels.dtype)
    theta[:, 0, 0] = zoom
    theta[:, 1, 1] = zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(unit_pixels.shape), align_corners=False)
    # grid_sample pads with zeros; sample (x - fill) and add fill back so the border is white.
    shifted = F.grid_sample(unit_pixels - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (shifted + fill).clamp_(0.0, 1.0)
