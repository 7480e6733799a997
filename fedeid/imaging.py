"""Resizing between an image's native resolution and the networks' size: one place for it.

Every size change in fedeid goes through here (loaders, networks, the de-identifier, the DICOM
pixel path), so down- and up-sampling behave identically wherever an image travels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of [B, C, H, W] (non-square inputs are stretched)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize_array(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """[H, W] or [N, H, W] float images -> the same at ``size`` (values clipped to [0, 1])."""
    a = np.asarray(images, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(a.reshape(-1, 1, *a.shape[-2:])))
    out = resize(x, size)[:, 0].numpy().clip(0.0, 1.0)
    return out.reshape(*a.shape[:-2], *out.shape[-2:]).astype(np.float32)


def upsample_result(synth: np.ndarray, mask: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A de-identified image and its block mask at the model's size -> both at native ``shape``.

    The mask is upsampled by nearest neighbour (patches stay patches), the synthesis bilinearly;
    callers keep their native pixels outside the mask, so nothing visible loses resolution.
    """
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    m_up = F.interpolate(m, size=shape, mode="nearest")[0, 0].numpy() > 0.5
    return resize_array(synth, shape), m_up
