"""The classical baselines: identity at level 0, range, monotone strength, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedeid.eval.baselines import (
    BASELINES,
    blur_sigma,
    dp_pix,
    dp_pix_cell,
    dp_pix_epsilon,
    pixelate,
    pixelate_block,
)

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _images(n: int = 3, size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth gradient with a disc plus fine texture: structure at every scale."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.3 + 0.3 * xx + 0.3 * ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.08)
    return np.clip(base[None] + rng.normal(0, 0.08, (n, size, size)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_level_zero_is_identity_and_output_is_well_formed(name: str) -> None:
    images = _images()
    before = images.copy()
    f = BASELINES[name]
    out0 = f(images, 0.0, np.random.default_rng(0))
    assert out0 is not images and np.array_equal(out0, images)
    for level in LEVELS[1:]:
        out = f(images, level, np.random.default_rng(0))
        assert out.shape == images.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.array_equal(images, before)
    with pytest.raises(ValueError):
        f(images, 1.5, np.random.default_rng(0))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_change_grows_with_level_and_is_deterministic(name: str) -> None:
    images = _images()
    f = BASELINES[name]
    draws = 1 if name != "dppix" else 4  # DP-Pix: monotone in expectation over its noise
    change = [np.mean([np.abs(f(images, lv, np.random.default_rng(s)) - images).mean() for s in range(draws)])
              for lv in LEVELS]
    assert change[0] == 0.0 and all(b > a for a, b in zip(change, change[1:])), change
    assert np.array_equal(f(images, 0.6, np.random.default_rng(7)), f(images, 0.6, np.random.default_rng(7)))


def test_parameter_mappings() -> None:
    assert blur_sigma(0.0, 128) == 0 and blur_sigma(1.0, 128) == 16
    assert pixelate_block(0.0, 128) == 1 and pixelate_block(1.0, 128) == 32
    assert dp_pix_cell(128) == 8 and dp_pix_cell(64) == 4
    eps = [dp_pix_epsilon(lv) for lv in LEVELS]
    assert math.isinf(eps[0]) and eps[-1] == pytest.approx(0.1) and all(b < a for a, b in zip(eps, eps[1:]))


def test_pixelate_handles_sizes_the_block_does_not_divide() -> None:
    images = np.random.default_rng(1).random((2, 10, 13)).astype(np.float32)
    out = pixelate(images, 0.45, np.random.default_rng(0))  # block round(1 + 0.45 * 1.5) = 2
    assert out.shape == images.shape
    assert out[0, 0, 0] == pytest.approx(images[0, :2, :2].mean())
    assert out[0, 9, 12] == pytest.approx(images[0, 8:10, 12].mean())


def test_dp_pix_noise_matches_its_calibration() -> None:
    """Per-cell Laplace noise of scale m / (b² ε) on [0, 1]: std √2 · scale."""
    images = np.full((40, 64, 64), 0.5, dtype=np.float32)
    level = 0.3
    out = dp_pix(images, level, np.random.default_rng(0))
    b = dp_pix_cell(64)
    cells = out[:, ::b, ::b]
    assert np.array_equal(np.repeat(np.repeat(cells, b, 1), b, 2), out)
    scale = 16 / (b**2 * dp_pix_epsilon(level))
    assert cells.std() == pytest.approx(math.sqrt(2) * scale, rel=0.05)
