"""The picture grid every evaluation writes: what a radiologist would see, at 100 % zoom.

Figures say how private and how useful the images are; only the images themselves show whether
synthesised regions look synthetic (checkerboard from upsampling, seams at the mask border,
blur). The grid puts, for a few held-out patients, the original beside each method's output at
a few levels, one image pixel per screen pixel: nothing is resampled, so no artefact is hidden
or invented by the figure itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from fedeid.eval.attackers import Method, to_uint8
from fedeid.io import atomic_save

GRID_LEVELS: tuple[float, ...] = (0.2, 0.6, 1.0)
_GAP = 4  # pixels between tiles
_LABEL_W = 120  # left column for "method / patient"
_HEADER_H = 16
_BACKGROUND = 255
_INK = 0


def grid_images(images: np.ndarray, methods: dict[str, Method],
                levels: tuple[float, ...] = GRID_LEVELS) -> tuple[list[list[np.ndarray]], list[str], list[str]]:
    """Tiles [row][column] (float [H, W]), row labels and column labels.

    One row per (image, method): the original, then the method at each level. Each method runs
    on all the chosen images at once, as the evaluation runs it.
    """
    if images.ndim != 3 or not len(images):
        raise ValueError(f"expected images [N, H, W] with N >= 1, got shape {images.shape}")
    outputs = {name: [np.asarray(m(images, lv)) for lv in levels] for name, m in methods.items()}
    rows, labels = [], []
    for i in range(len(images)):
        for name, per_level in outputs.items():
            rows.append([images[i], *(out[i] for out in per_level)])
            labels.append(f"{name}\nimage {i + 1}")
    return rows, labels, ["original", *(f"level {lv:g}" for lv in levels)]


def write_grid(images: np.ndarray, methods: dict[str, Method], path: str | os.PathLike[str],
               levels: tuple[float, ...] = GRID_LEVELS) -> None:
    """Compose the grid as one 8-bit grey PNG at 100 % zoom and write it atomically to ``path``."""
    compose(*grid_images(images, methods, levels), path)


def write_counterfactual_grid(images: np.ndarray, counterfactual: Callable[[np.ndarray, dict[str, int]], np.ndarray],
                              findings: tuple[str, ...], path: str | os.PathLike[str]) -> None:
    """Method B's counterfactuals for a person to look at: per image, the original and each
    finding set to 0 and to 1 (``counterfactual(images, {finding: value})``), at 100 % zoom."""
    if images.ndim != 3 or not len(images):
        raise ValueError(f"expected images [N, H, W] with N >= 1, got shape {images.shape}")
    columns = [(name, value) for name in findings for value in (0, 1)]
    outputs = [np.asarray(counterfactual(images, {name: value})) for name, value in columns]
    rows = [[images[i], *(out[i] for out in outputs)] for i in range(len(images))]
    compose(rows, [f"image {i + 1}" for i in range(len(images))],
            ["original", *(f"{name}={value}" for name, value in columns)], path)


def compose(rows: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str],
            path: str | os.PathLike[str]) -> None:
    """Tiles [row][column] of one size, labelled, as one 8-bit grey PNG written atomically."""
    h, w = rows[0][0].shape
    width = _LABEL_W + len(col_labels) * (w + _GAP)
    height = _HEADER_H + len(rows) * (h + _GAP)
    canvas = np.full((height, width), _BACKGROUND, dtype=np.uint8)
    for r, tiles in enumerate(rows):
        y = _HEADER_H + r * (h + _GAP)
        for c, tile in enumerate(tiles):
            x = _LABEL_W + c * (w + _GAP)
            canvas[y:y + h, x:x + w] = to_uint8(tile)
    picture = Image.fromarray(canvas)  # uint8 [H, W]: 8-bit grey
    draw = ImageDraw.Draw(picture)
    for c, label in enumerate(col_labels):
        draw.text((_LABEL_W + c * (w + _GAP) + 2, 2), label, fill=_INK)
    for r, label in enumerate(row_labels):
        draw.multiline_text((2, _HEADER_H + r * (h + _GAP) + h // 2 - 10), label, fill=_INK)
    atomic_save(path, lambda fh: picture.save(fh, format="PNG"))


def grid_sample(patient_ids: np.ndarray, queries: np.ndarray, n_patients: int = 3) -> np.ndarray:
    """Indices of the first query image of the first ``n_patients`` patients (held-out images)."""
    seen: list[int] = []
    chosen: list[int] = []
    for i in queries:
        pid = int(patient_ids[i])
        if pid not in seen:
            seen.append(pid)
            chosen.append(int(i))
        if len(chosen) == n_patients:
            break
    return np.asarray(chosen, dtype=np.int64)
