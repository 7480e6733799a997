"""De-identification of images at their own resolution, several at a time.

Both methods' de-identifiers work at one model size, and a folder of images (or the frames of
one DICOM file) has many sizes. Each image is resized to the model's size, the batch goes
through the network together (on CPU the batch-16 rate is about 1.7 x the batch-1 rate), and
each result is composed back at its own resolution by the de-identifier's ``compose_native``:
the one path of ``fedeid deid``, ``fedeid dicom deid`` and ``deidentify_native``.

torch is imported on first use, not here: header-only DICOM runs import this module's protocol
and start faster without it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np


class ModelSizeDeIdentifier(Protocol):
    """What :func:`deidentify_natives` needs: method A's ``DeIdentifier`` and method B's alike."""

    image_size: int

    def deidentify(self, images: np.ndarray, level: float, batch_size: int = 16, compensate: bool = True,
                   seed: int | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def compose_native(self, native: np.ndarray, small: np.ndarray, out: np.ndarray, mask: np.ndarray,
                       level: float) -> tuple[np.ndarray, np.ndarray]: ...


def deidentify_natives(model: ModelSizeDeIdentifier, images: Sequence[np.ndarray], level: float,
                       seed: int | None = None, batch_size: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Grey images [H, W] in [0, 1], any sizes -> (de-identified [H, W], synthesised mask [H, W]) each.

    The network sees ``batch_size`` images at a time; the results are composed one by one as
    they are taken, so only one native-size result is held at once. One release draw covers
    the call (``seed``, or the OS's entropy): every image still gets its own mask, code and noise.
    """
    from fedeid.imaging import resize_array

    natives = [np.asarray(image, dtype=np.float32) for image in images]
    for image in natives:
        if image.ndim != 2:
            raise ValueError(f"expected grey images [H, W], got shape {image.shape}")
    if not natives:
        return
    small = np.stack([resize_array(image, int(model.image_size)) for image in natives])
    out, mask = model.deidentify(small, level, batch_size=batch_size, seed=seed)
    for k, native in enumerate(natives):
        yield model.compose_native(native, small[k], out[k], mask[k], level)
