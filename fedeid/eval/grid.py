"""A picture grid for a person to look at: the same test images through every method.

Figures summarise; a reader should also *see* what a de-identified or counterfactual image looks
like (a generator that learnt a blurry average chest scores some privacy for the wrong reason).
Rows are test images, columns are named versions of them (original, method A at some levels,
method B, counterfactuals), written as one PNG.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from fedeid.io import atomic_save  # noqa: E402


def write_picture_grid(columns: dict[str, np.ndarray], path: str | os.PathLike[str], dpi: int = 110) -> None:
    """``columns``: title -> images [R, H, W] in [0, 1] (the same R images in every column)."""
    if not columns:
        raise ValueError("nothing to draw")
    rows = {len(v) for v in columns.values()}
    if len(rows) != 1:
        raise ValueError(f"every column needs the same number of images, got {sorted(rows)}")
    n_rows, n_cols = rows.pop(), len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.6 * n_rows + 0.4), squeeze=False)
    for c, (title, images) in enumerate(columns.items()):
        axes[0, c].set_title(title, fontsize=7)
        for r in range(n_rows):
            axes[r, c].imshow(np.asarray(images[r]), cmap="gray", vmin=0.0, vmax=1.0)
            axes[r, c].axis("off")
    fig.tight_layout()
    try:
        atomic_save(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def picture_columns(images: np.ndarray, finding_names: tuple[str, ...], *, blocking: Any | None = None,
                    levels: tuple[float, ...] = (), replace: Any | None = None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """The issue's grid: original, method A (``blocking``) at three of ``levels``, method B
    (``replace``) at strength 1, and two counterfactuals (cardiomegaly, else the first finding, set to 1 and 0)."""
    cols: dict[str, np.ndarray] = {"original": images}
    if blocking is not None:
        nonzero = [lv for lv in levels if lv > 0]
        for lv in sorted({nonzero[0], nonzero[len(nonzero) // 2], nonzero[-1]}) if nonzero else []:
            cols[f"A: level {lv:g}"] = blocking.deidentify(images, lv)[0]
    if replace is not None:
        cols["B: synthetic identity"] = replace.deidentify(images, 1.0, seed=seed)[0]
        name = "cardiomegaly" if "cardiomegaly" in finding_names else finding_names[0]
        for value in (1, 0):
            cols[f"B: {name}={value}"] = replace.counterfactual(images, {name: value})
    return cols


def first_of_patients(patient_ids: np.ndarray, n: int = 4) -> np.ndarray:
    """Indices of the first image of each of the first ``n`` patients (distinct people in the grid)."""
    _, first = np.unique(patient_ids, return_index=True)
    return np.sort(first)[:n]
