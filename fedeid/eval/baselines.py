"""Classical pixel-level de-identification baselines on fedeid's privacy axis (method.md, A.5).

Every baseline is ``f(images [N, H, W] float32 in [0, 1], level in [0, 1], rng) -> images`` of
the same shape, float32 in [0, 1], with the input left untouched. ``level`` is the same knob as
fedeid's: 0 returns the input unchanged, 1 is the strongest setting, and the parameter grows
monotonically in between, so the baselines' privacy–utility curves are swept over the same
levels as fedeid's. ``size`` below is ``min(H, W)``. The mappings (exposed as helpers so reports
can print the actual parameters) span "no change" to "nearly nothing left":

* ``blur`` — Gaussian blur, σ = level · size / 8 (16 px at 128 px: only the body outline is left);
* ``pixelate`` — mean over b×b cells, b = round(1 + level · (size/4 − 1)) (a 4×4 grid at level 1);
* ``dppix`` — DP-Pix (Fan, DBSec 2018): b×b pixelation plus Laplace noise calibrated to ε, with
  ε falling log-linearly from 100 to 0.1 (see :func:`dp_pix_epsilon`).

Blur and pixelation are deterministic and ignore ``rng``; DP-Pix draws its noise from it.
The model-based baselines ("block", "no_decoupler") live with the models, not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Baseline = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

# DP-Pix defaults: m = 16 differing pixels protected (Fan's neighbouring images differ in at most
# m pixels), ε from 100 (noise ≪ grey-level steps: pure pixelation) down to 0.1 (noise scale
# several times the whole grey range: the image is noise).
DPPIX_M = 16
DPPIX_EPS_MAX = 100.0
DPPIX_EPS_MIN = 0.1


def _check(images: np.ndarray, level: float) -> None:
    if images.ndim != 3:
        raise ValueError(f"images must be [N, H, W], got shape {images.shape}")
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1], got {level}")


def blur_sigma(level: float, size: int) -> float:
    """Gaussian σ in pixels for ``level``: linear from 0 (no blur) to ``size / 8``."""
    return level * size / 8


def gaussian_blur(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Separable Gaussian blur with σ = :func:`blur_sigma`; reflect padding keeps borders unbiased.

    The kernel is truncated at 3σ (capped at the image size minus one, which reflect padding
    requires) and renormalised, so the output is a convex combination of inputs and stays in
    [0, 1].
    """
    _check(images, level)
    sigma = blur_sigma(level, min(images.shape[1:]))
    if sigma == 0:
        return images.astype(np.float32, copy=True)
    radius = min(math.ceil(3 * sigma), min(images.shape[1:]) - 1)
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return np.clip(x[:, 0].numpy(), 0.0, 1.0).astype(np.float32, copy=False)


def pixelate_block(level: float, size: int) -> int:
    """Cell side in pixels for ``level``: 1 (unchanged) at 0 up to ``size / 4`` at 1."""
    return max(1, round(1 + level * (size / 4 - 1)))


def _cell_means(images: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of each block×block cell, cells starting at the top-left; edge cells may be smaller.

    Returns the means [N, ceil(H/b), ceil(W/b)] and the cell heights and widths, so sizes that
    ``block`` does not divide are averaged over the pixels they really hold.
    """
    h, w = images.shape[1:]
    rows, cols = np.arange(0, h, block), np.arange(0, w, block)
    sums = np.add.reduceat(np.add.reduceat(images.astype(np.float64), rows, axis=1), cols, axis=2)
    heights, widths = np.diff(np.r_[rows, h]), np.diff(np.r_[cols, w])
    return sums / (heights[:, None] * widths[None, :]), heights, widths


def _upsample(cells: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upsampling of cell values back to the cells' pixels."""
    return np.repeat(np.repeat(cells, heights, axis=1), widths, axis=2)


def pixelate(images: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Replace each b×b cell by its mean, b = :func:`pixelate_block` (average pool, nearest upsample)."""
    _check(images, level)
    block = pixelate_block(level, min(images.shape[1:]))
    if block == 1:
        return images.astype(np.float32, copy=True)
    cells, heights, widths = _cell_means(images, block)
    return np.clip(_upsample(cells, heights, widths), 0.0, 1.0).astype(np.float32)


def dp_pix_epsilon(level: float) -> float:
    """Privacy budget ε of DP-Pix at ``level``: ``inf`` at 0, else ``100 · (0.1/100) ** level``.

    Log-linear, so equal level steps divide ε by equal factors (ε = 25, 6.3, 1.6, 0.40, 0.10 at
    levels 0.2 … 1.0): the Laplace scale m/(b²ε) grows geometrically from imperceptible to
    swamping the image. Level 0 is the unprotected identity, the common starting point of all
    methods; any level > 0 already pixelates, since DP-Pix has no un-pixelated setting.
    """
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1], got {level}")
    if level == 0:
        return math.inf
    return DPPIX_EPS_MAX * (DPPIX_EPS_MIN / DPPIX_EPS_MAX) ** level


def dp_pix_cell(size: int) -> int:
    """DP-Pix cell side b = size / 16 (8 px at 128 px, 4 px at 64 px).

    b trades pixelation error (grows with b) against the Laplace scale 255·m/(b²ε) (falls as
    1/b²). A 16×16 grid keeps the coarse anatomy a chest-X-ray finding classifier reads (heart
    silhouette, diaphragm, large effusions and opacities) while dividing the noise by b² = 64
    at 128 px relative to per-pixel noise; tying b to the size keeps the same grid at every
    resolution.
    """
    return max(1, size // 16)


def dp_pix(
    images: np.ndarray, level: float, rng: np.random.Generator, *, m: int = DPPIX_M, cell: int | None = None
) -> np.ndarray:
    """DP-Pix (Fan, "Image pixelization with differential privacy", DBSec 2018).

    Each b×b cell mean (b = ``cell`` or :func:`dp_pix_cell`) gets independent Laplace noise of
    scale 255·m/(b²ε) on the 0–255 scale, i.e. m/(b²ε) on [0, 1]: neighbouring images differ in
    at most ``m`` pixels, each by at most 255, which moves one cell mean by at most 255·m/b².
    ε = :func:`dp_pix_epsilon` (level); clipping to [0, 1] is post-processing and keeps the
    guarantee. Edge cells that b does not divide hold fewer pixels and are computed over those
    (their sensitivity is then larger than the noise assumes; with the default b = size/16 and
    the power-of-two sizes fedeid uses, there are none).
    """
    _check(images, level)
    eps = dp_pix_epsilon(level)
    if math.isinf(eps):
        return images.astype(np.float32, copy=True)
    block = cell if cell is not None else dp_pix_cell(min(images.shape[1:]))
    cells, heights, widths = _cell_means(images, block)
    cells = cells + rng.laplace(0.0, m / (block**2 * eps), size=cells.shape)
    return np.clip(_upsample(cells, heights, widths), 0.0, 1.0).astype(np.float32)


BASELINES: dict[str, Baseline] = {"blur": gaussian_blur, "pixelate": pixelate, "dppix": dp_pix}
