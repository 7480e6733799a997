"""Pixel de-identification of a DICOM image: native stored values → model → native stored values.

Normalisation (what the model sees), per frame:

1. decode the stored values with pydicom's pixel plugins (native, RLE, JPEG, JPEG-LS, JPEG 2000);
2. apply the Modality LUT: the linear Rescale Slope/Intercept (per frame for enhanced images) or
   a Modality LUT Sequence;
3. robust window: the 0.5th and 99.5th percentiles of the frame map to 0 and 1, values beyond
   are clipped — a VOI window a site chose for display may hide the anatomy the model needs,
   and percentiles ignore the few extreme pixels (collimator edges, markers) that would
   otherwise squash the range;
4. MONOCHROME1 is inverted, so bright always means dense, as in training;
5. resize to the model's S×S (area averaging when shrinking, bilinear when enlarging).

The model returns the de-identified S×S image and the mask of blocked (synthesised) pixels, and
composes them with the frame at native resolution (``compose_native``: fedeid's model re-renders
every pixel above level 0, visible ones from a low-pass, so none is copied). Every pixel the model
changed goes back through the inverse of steps 4, 3 and 2, is rounded and clipped to the range
Bits Stored and Pixel Representation allow, and takes the original dtype; a pixel it did not change
keeps its exact stored value. At level 0 nothing changes, so the stored values are exactly the
decoded input. The result is written
uncompressed (Explicit VR Little Endian) with the original Photometric Interpretation, Bits
Allocated/Stored and signedness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from fedeid.deid.native import ModelSizeDeIdentifier, deidentify_natives

# Transfer syntaxes whose decoding is certainly lossy, and the method code (Lossy Image
# Compression Method, PS3.3 C.7.6.1.1.5) to record when the source did not.
LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
}
GREY = ("MONOCHROME1", "MONOCHROME2")
LOW_PCT, HIGH_PCT = 0.5, 99.5


class PixelModel(ModelSizeDeIdentifier, Protocol):
    """What the pixel path needs of :class:`fedeid.deid.pipeline.DeIdentifier` (either method)."""

    level_range: tuple[float, float]
    modalities: tuple[str, ...]


@dataclass
class PixelResult:
    """What happened to the pixels of one file (for the manifest)."""

    frames: int
    blocked_fraction: float
    lossy_source: bool


def refusal(ds: Dataset, model: PixelModel) -> str | None:
    """Why this file cannot go through the model, or ``None`` if it can.

    A refusal is a deliberate no: the file is not written, so no identifying pixel leaves.
    """
    modality = str(ds.get("Modality", "") or "").strip()
    if modality not in model.modalities:
        trained = ", ".join(model.modalities) or "none"
        return f"modality {modality or '(none)'} is not one the model was trained for ({trained})"
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return "float pixel data: the model de-identifies stored integer images only"
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or (photometric and photometric not in GREY):
        return f"colour image ({photometric or 'unknown'}, {samples} samples per pixel): the model is greyscale"
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if "PixelData" in ds and bits not in (8, 16):
        return f"Bits Allocated {bits}: only 8- and 16-bit stored images are supported"
    return None


def frame_rescales(ds: Dataset, n_frames: int) -> list[tuple[float, float]]:
    """(slope, intercept) per frame: per-frame, shared functional groups, or the top level."""

    def from_item(item: Dataset) -> tuple[float, float] | None:
        seq = item.get("PixelValueTransformationSequence")
        if seq:
            t = seq[0]
            return float(t.get("RescaleSlope", 1) or 1), float(t.get("RescaleIntercept", 0) or 0)
        return None

    top = (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_rs = from_item(shared[0]) if shared else None
    per = ds.get("PerFrameFunctionalGroupsSequence")
    out = []
    for i in range(n_frames):
        rs = from_item(per[i]) if per and i < len(per) else None
        out.append(rs or shared_rs or top)
    return out


class _ModalityLut:
    """Forward and inverse Modality LUT of one frame (linear rescale or LUT Sequence)."""

    def __init__(self, ds: Dataset, slope: float, intercept: float) -> None:
        self.slope, self.intercept = slope, intercept
        self.table: np.ndarray | None = None
        seq = ds.get("ModalityLUTSequence")
        if seq and "LUTData" in seq[0]:
            item = seq[0]
            descriptor = [int(v) for v in item.LUTDescriptor]
            self.first = descriptor[1]
            self.table = np.asarray(item.LUTData, dtype=np.float64).ravel()
            self.order = np.argsort(self.table, kind="stable")
            self.sorted = self.table[self.order]

    def forward(self, stored: np.ndarray) -> np.ndarray:
        if self.table is None:
            return stored.astype(np.float64) * self.slope + self.intercept
        idx = np.clip(stored.astype(np.int64) - self.first, 0, len(self.table) - 1)
        return self.table[idx]

    def inverse(self, values: np.ndarray) -> np.ndarray:
        if self.table is None:
            return (values - self.intercept) / self.slope
        pos = np.clip(np.searchsorted(self.sorted, values), 1, len(self.sorted) - 1)
        left = self.sorted[pos - 1]
        right = self.sorted[pos]
        pos = np.where(np.abs(values - left) <= np.abs(right - values), pos - 1, pos)
        return (self.order[pos] + self.first).astype(np.float64)


def stored_range(ds: Dataset) -> tuple[int, int]:
    """The values Bits Stored and Pixel Representation allow."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0) or 0):
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def deidentify_pixels(ds: Dataset, model: PixelModel, level: float, batch_size: int = 16) -> PixelResult:
    """Replace the pixels of ``ds`` (in place) by their de-identified version at ``level``.

    Call :func:`refusal` first; this assumes a greyscale integer image.
    """
    source_syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    stored = np.asarray(ds.pixel_array)
    # Big-endian sources decode to a big-endian dtype; the output is little endian.
    stored = stored.astype(stored.dtype.newbyteorder("="), copy=False)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frames = stored.reshape(n_frames, stored.shape[-2], stored.shape[-1]) if stored.ndim == 3 else stored[None]
    rows, cols = frames.shape[-2:]
    invert = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    luts = [_ModalityLut(ds, s, i) for s, i in frame_rescales(ds, len(frames))]

    unit = np.empty(frames.shape, dtype=np.float32)
    windows = []
    for k, frame in enumerate(frames):
        values = luts[k].forward(frame)
        lo, hi = np.percentile(values, [LOW_PCT, HIGH_PCT])
        if hi <= lo:
            hi = lo + 1.0
        x = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
        unit[k] = 1.0 - x if invert else x
        windows.append((float(lo), float(hi)))

    lo_v, hi_v = stored_range(ds)
    out = frames.copy()
    blocked = 0
    for k, (y_up, m_up) in enumerate(deidentify_natives(model, unit, level, batch_size=batch_size)):
        changed = y_up != unit[k]
        if not changed.any():
            continue
        y_up = y_up.astype(np.float64)
        if invert:
            y_up = 1.0 - y_up
        lo, hi = windows[k]
        native = np.clip(np.rint(luts[k].inverse(lo + y_up * (hi - lo))), lo_v, hi_v)
        out[k][changed] = native[changed].astype(frames.dtype)
        blocked += int(m_up.sum())

    _write_native(ds, out if n_frames > 1 else out[0])
    lossy = source_syntax in LOSSY_SYNTAXES or str(ds.get("LossyImageCompression", "")) == "01"
    if source_syntax in LOSSY_SYNTAXES:
        # The values are those a lossy decoder produced: the history must say so (PS3.3 C.7.6.1.1.5).
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = LOSSY_SYNTAXES[source_syntax]
    return PixelResult(frames=len(frames), blocked_fraction=blocked / float(out.size), lossy_source=lossy)


def _write_native(ds: Dataset, arr: np.ndarray) -> None:
    """Store ``arr`` uncompressed, keeping Photometric Interpretation and Bits Stored."""
    syntax: Any = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_little_endian or syntax.is_compressed or syntax.is_deflated:
        # set_pixel_data writes little endian; an uncompressed output says so in its meta.
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(
        arr,
        photometric_interpretation=str(ds.PhotometricInterpretation),
        bits_stored=int(ds.BitsStored),
        generate_instance_uid=False,
    )
