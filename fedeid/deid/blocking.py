"""Identity blocking: rank patches by identity saliency and block the top ``level`` fraction.

``level`` is the privacy knob: the number of blocked patches is ``round(level * n_patches)``,
so the blocked fraction equals the level to within half a patch (0 blocks nothing, 1 blocks
everything) whatever the saliency looks like.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_grid(image_size: int, patch_size: int) -> int:
    if patch_size <= 0 or image_size % patch_size:
        raise ValueError(f"patch size {patch_size} must divide the image size {image_size}")
    return image_size // patch_size


def patch_scores(saliency: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """Saliency [B, 1, h, w] at any resolution -> mean relevance per patch [B, g*g]."""
    sal = F.interpolate(saliency, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return F.avg_pool2d(sal, patch_size).flatten(1)


def block_mask(scores: torch.Tensor, level: float | torch.Tensor, image_size: int,
               patch_size: int) -> torch.Tensor:
    """Mask [B, 1, H, W], 1 on the ``round(level * P)`` most identity-relevant patches of each image.

    ``level`` is a float or a per-image tensor [B] (training samples one level per image).
    """
    g = patch_grid(image_size, patch_size)
    n = scores.shape[1]
    if n != g * g:
        raise ValueError(f"{n} patch scores for a {g}x{g} grid")
    level_t = torch.as_tensor(level, dtype=torch.float32, device=scores.device).reshape(-1)
    if bool(((level_t < 0) | (level_t > 1)).any()):
        raise ValueError(f"level must lie in [0, 1], got {level}")
    k = torch.round(level_t * n).long().expand(scores.shape[0])
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = most identity-relevant
    blocked = (rank < k[:, None]).float().reshape(-1, 1, g, g)
    return F.interpolate(blocked, scale_factor=patch_size, mode="nearest")
