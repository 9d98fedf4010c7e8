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


def _stable_seed(image_id: str, aug_id: int, seed: int) -> int:
    """A seed that depends only on (image id, augmentation id, seed): never on batch order or
    process, so the teacher cache and every training process replay identical pixels."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}\x00{image_id}\x00{aug_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def replay_augmentation(
    unit_pixels: torch.Tensor,
    image_ids: list[str],
    aug_ids: torch.Tensor | list[int],
    *,
    seed: int = 0,
    scale: tuple[float, float] = (0.8, 1.0),
    max_shift: float = 0.1,
) -> torch.Tensor:
    """Apply augmentation number ``aug_ids[i]`` of image ``image_ids[i]``; 0 is the plain image.

    This is MobileCLIP's "dataset reinforcement" idea: k fixed augmentations per image, so a
    teacher's outputs for each can be computed once and cached, and training replays them.
    """
    ids = [int(a) for a in aug_ids]
    if len(ids) != len(image_ids) or len(ids) != unit_pixels.shape[0]:
        raise ValueError(f"{unit_pixels.shape[0]} images, {len(image_ids)} ids and {len(ids)} augmentation ids")
    out = unit_pixels.clone()
    augmented = [i for i, a in enumerate(ids) if a != 0]
    for i in augmented:
        generator = torch.Generator().manual_seed(_stable_seed(image_ids[i], ids[i], seed))
        out[i : i + 1] = random_scale_translate(
            unit_pixels[i : i + 1], scale=scale, max_shift=max_shift, generator=generator
        )
    return out
