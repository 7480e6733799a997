"""Synthetic chest radiographs with known patient identity and findings: fedeid's default benchmark.

No real data set with several images per patient can be installed here, and de-identification can
only be measured with one: a re-identification attacker must match *other acquisitions of the same
patient*. This module therefore draws patients whose anatomy identifies them the way real anatomy
does, and images whose findings are independent of that identity.

What it models
    * **Patient identity** (fixed across a patient's images, spread over the whole image so that
      blocking more area removes more identity): body habitus (width, soft-tissue density, neck and
      shoulders), lung fields (apex height, width, mediastinal border, diaphragm dome, costophrenic
      angle sharpness, left/right asymmetry), heart baseline (centre, size, tilt), aortic knob,
      trachea and carina, spine (position, width, vertebral spacing), posterior and anterior ribs
      (count, spacing and its growth, curvature, per-rib thickness and offset, side asymmetry),
      clavicles (height, angle, length, bend), scapular borders, breast/pectoral soft-tissue
      shadows and fine structure: a patient-specific branching vessel tree in each lung and a
      band-limited parenchymal/bone texture.
    * **Acquisition** (new for every image): rotation, translation, scale, inspiration depth
      (vertical stretch of the thorax), cardiac phase, exposure, window, gamma, blur and
      signal-dependent noise.
    * **Findings** (multi-label, drawn per image independently of identity, at per-site
      prevalences): ``nodule`` (small round opacity in a lung), ``effusion`` (meniscus-shaped basal
      fluid that blunts the costophrenic angle), ``cardiomegaly`` (heart 22-38 % wider than *that
      patient's* baseline) and ``opacity`` (an irregular consolidation patch in one lung zone). All
      act by replacing lung air with tissue density.
    * **Sites**: every hospital has a scanner profile (exposure, window, gamma, blur, noise,
      intensity offset, optional collimation border) and a non-IID population (habitus shift and
      finding prevalences in [0.15, 0.40]).

What it does not model
    Physics (no ray tracing, scatter or beam hardening), realistic pathology appearance or
    co-occurrence, lateral views, devices, text markers, ageing between visits, or any real
    patient. It is a stand-in with the *structure* of the problem (identity in anatomy, findings in
    local density), not a chest X-ray simulator; figures measured on it are not clinical figures.

Determinism: every random draw comes from a numpy Generator seeded by ``(cfg.seed, stream, site,
patient[, image])``, so one patient's images do not depend on how many other patients, images per
patient or sites there are, and the same config always yields identical arrays. Patient anatomy is
defined in continuous coordinates (the texture on a fixed 64x64 lattice), so a patient keeps the same
anatomy at every ``image_size``.

Ids: training patient ``k`` of site ``s`` has id ``s * 100000 + k``. Held-out test patient ``k`` has
id ``10000000 + k`` and belongs to the population and scanner of site ``k % n_sites``, which is what
its ``sites`` entry holds (so utility can be broken down per scanner); filter training data by
patient id, never by site, when test patients may be mixed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedeid.config import FINDINGS, DataConfig
from fedeid.data.imageset import ImageSet

MIN_SIZE, MAX_SIZE = 64, 256
SITE_ID_STRIDE = 100_000
TEST_ID_BASE = 10_000_000
MAX_SITES = TEST_ID_BASE // SITE_ID_STRIDE

# Random streams: separate seeds for separate kinds of draws, so adding a draw to one kind never
# shifts another.
_STREAM_SITE, _STREAM_ANATOMY, _STREAM_IMAGE, _STREAM_TEST_ANATOMY, _STREAM_TEST_IMAGE = range(5)

_BASE_PREVALENCE = np.array([0.25, 0.25, 0.28, 0.30])  # order of FINDINGS
_TEXTURE_GRID = 64  # the texture lattice, fixed so identity does not depend on image_size
_MU = 1.6  # density -> transmitted-intensity scale of the reference exposure
_INSPIRATION_PIVOT = -0.75  # lung apices: inspiration stretches the thorax downwards from here


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**63, *keys])


@dataclass(frozen=True)
class ScannerProfile:
    """One hospital: its scanner's rendering and its patient population."""

    exposure: float  # mean density->intensity scale factor
    window: tuple[float, float]  # intensity window mapped to [0, 1]
    gamma: float
    offset: float  # additive intensity offset after windowing
    blur: float  # gaussian blur sigma in pixels at 128 px
    noise: float  # noise std at mid grey
    collimation: float  # border fraction per side blanked by the collimator (0 = none)
    prevalence: np.ndarray  # per finding, order of FINDINGS
    habitus: float  # shift of mean body half-width
    tissue: float  # shift of mean soft-tissue density


def site_profile(seed: int, site: int) -> ScannerProfile:
    """The scanner and population of hospital ``site``; depends only on ``(seed, site)``."""
    r = _rng(seed, _STREAM_SITE, site)
    lo = r.uniform(0.0, 0.10)
    return ScannerProfile(
        exposure=float(r.uniform(0.85, 1.15)),
        window=(float(lo), float(r.uniform(0.85, 1.0))),
        gamma=float(r.uniform(0.8, 1.25)),
        offset=float(r.uniform(-0.04, 0.04)),
        blur=float(r.uniform(0.3, 1.0)),
        noise=float(r.uniform(0.008, 0.03)),
        collimation=float(r.uniform(0.02, 0.06)) if r.random() < 0.5 else 0.0,
        prevalence=np.clip(_BASE_PREVALENCE * np.exp(r.normal(0.0, 0.3, len(FINDINGS))), 0.15, 0.40),
        habitus=float(r.normal(0.0, 0.03)),
        tissue=float(r.normal(0.0, 0.03)),
    )


@dataclass(frozen=True)
class Anatomy:
    """A patient's identity: everything here is the same in all of their images.

    Coordinates are normalised to [-1, 1] (x to the image right, y down); the patient faces the
    viewer (PA view), so the heart lies to the image right. Per-side arrays are indexed
    ``[image-left lung, image-right lung]``.
    """

    body_w: float
    tissue: float
    shoulder_y: float
    neck_w: float
    spine_x: float
    spine_w: float
    vert_h: float
    vert_phase: float
    trachea_x: float
    trachea_w: float
    carina_y: float
    apex: np.ndarray  # [2]
    base: np.ndarray  # [2] lateral costophrenic height
    medial: np.ndarray  # [2]
    lateral: np.ndarray  # [2]
    dome: np.ndarray  # [2]
    corner: np.ndarray  # [2] superellipse exponent of the lung base: larger = sharper angle
    air: float  # how much density lung air removes
    heart: np.ndarray  # [cx, cy, rx, ry, tilt]
    knob: np.ndarray  # [cx, cy, r] aortic knob
    rib_y0: np.ndarray  # [2] height of the first posterior rib at the spine
    rib_sp: np.ndarray  # [2] rib spacing
    rib_growth: float  # spacing grows by this fraction per rib
    rib_curve: np.ndarray  # [3] coefficients of the rib centre line in distance from the spine
    rib_n: int
    rib_offset: np.ndarray  # [2, 14] per-rib offset, fraction of spacing
    rib_thick: np.ndarray  # [2, 14] per-rib thickness, fraction of spacing
    ant_slope: float
    clav: np.ndarray  # [2, 4] height, angle, length, bend per side
    scapula: np.ndarray  # [2, 3] medial border: distance from midline at the top, slope, lower tip
    breast: np.ndarray  # [2, 4] soft-tissue shadow: density, centre x, centre y, radius
    vessels: np.ndarray  # [M, 5] segments x0, y0, x1, y1, width
    texture: np.ndarray  # [64, 64] band-limited, unit std

    def vector(self) -> np.ndarray:
        """The global shape parameters as one vector (for comparing patients in tests)."""
        return np.concatenate([
            [self.body_w, self.tissue, self.shoulder_y, self.neck_w, self.spine_x, self.spine_w,
             self.vert_h, self.trachea_x, self.carina_y, self.air, self.rib_growth, self.ant_slope],
            self.apex, self.base, self.medial, self.lateral, self.dome, self.heart, self.knob,
            self.rib_y0, self.rib_sp, self.rib_curve, self.clav.ravel(), self.scapula.ravel(),
            self.breast.ravel(),
        ]).astype(np.float64)


def _vessel_tree(r: np.random.Generator, hila: np.ndarray) -> np.ndarray:
    """A branching pattern from each hilum: a fine, patient-specific fingerprint inside the lungs."""
    segments: list[tuple[float, float, float, float, float]] = []
    for side, (hx, hy) in zip((-1.0, 1.0), hila):
        angles = np.linspace(-1.35, 1.35, 6) + r.normal(0.0, 0.12, 6)
        for angle in angles:
            start_x = hx + side * r.uniform(0.0, 0.08)
            start_y = hy + 0.06 * math.sin(angle) + r.normal(0.0, 0.01)
            stack = [(start_x, start_y, angle, r.uniform(0.15, 0.24), r.uniform(0.022, 0.032), 0)]
            while stack:
                x, y, a, length, width, depth = stack.pop()
                x1 = x + side * math.cos(a) * length
                y1 = y + math.sin(a) * length
                segments.append((x, y, x1, y1, width))
                if depth < 3:
                    spread = r.uniform(0.25, 0.55)
                    for turn in (-spread, spread):
                        stack.append((x1, y1, a + turn + r.normal(0.0, 0.1),
                                      length * r.uniform(0.6, 0.8), width * 0.72, depth + 1))
    return np.asarray(segments, dtype=np.float32)


def _band_limited(r: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """Gaussian noise kept between two spatial frequencies (cycles per lattice), unit std."""
    f = np.fft.fftfreq(n) * n
    rad = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    keep = np.exp(-0.5 * ((rad - 0.5 * (low + high)) / (0.5 * (high - low))) ** 2)
    field = np.fft.ifft2(np.fft.fft2(r.standard_normal((n, n))) * keep).real
    return (field / (field.std() + 1e-12)).astype(np.float32)


def _anatomy(r: np.random.Generator, profile: ScannerProfile) -> Anatomy:
    """Draw one patient from a site's population."""
    body_w = float(np.clip(0.86 + profile.habitus + r.normal(0.0, 0.05), 0.70, 0.98))
    asym = r.normal(0.0, 0.025, 2)
    spine_x = float(r.normal(0.0, 0.015))
    lateral = body_w - 0.09 - np.abs(r.normal(0.0, 0.03)) + asym
    apex = -0.68 + r.normal(0.0, 0.05) + r.normal(0.0, 0.025, 2)
    base = 0.46 + r.normal(0.0, 0.06) + r.normal(0.0, 0.03, 2)
    heart = np.array([0.08 + r.normal(0.0, 0.03), 0.22 + r.normal(0.0, 0.04),
                      0.33 * math.exp(r.normal(0.0, 0.05)), 0.22 * math.exp(r.normal(0.0, 0.07)),
                      r.uniform(0.1, 0.6)])
    hila = np.array([[-0.17 + r.normal(0.0, 0.015), -0.06 + r.normal(0.0, 0.035)],
                     [0.17 + r.normal(0.0, 0.015), -0.04 + r.normal(0.0, 0.035)]])
    rib_y0 = -0.80 + r.normal(0.0, 0.04) + r.normal(0.0, 0.02, 2)
    rib_sp = 0.10 * math.exp(r.normal(0.0, 0.09)) * np.exp(r.normal(0.0, 0.03, 2))
    clav = np.stack([-0.64 + r.normal(0.0, 0.04) + r.normal(0.0, 0.02, 2),
                     0.30 + r.normal(0.0, 0.09, 2),
                     0.50 + r.normal(0.0, 0.05) + r.normal(0.0, 0.02, 2),
                     0.03 + r.normal(0.0, 0.015, 2)], axis=1)
    return Anatomy(
        body_w=body_w,
        tissue=float(0.52 + profile.tissue + r.normal(0.0, 0.05)),
        shoulder_y=float(-0.80 + r.normal(0.0, 0.04)),
        neck_w=float(0.30 + r.normal(0.0, 0.03)),
        spine_x=spine_x,
        spine_w=float(0.085 + r.normal(0.0, 0.008)),
        vert_h=float(0.085 * math.exp(r.normal(0.0, 0.08))),
        vert_phase=float(r.uniform(0.0, 1.0)),
        trachea_x=float(spine_x + r.normal(0.0, 0.012)),
        trachea_w=float(0.035 + r.normal(0.0, 0.005)),
        carina_y=float(-0.30 + r.normal(0.0, 0.035)),
        apex=apex,
        base=base,
        medial=np.array([0.10, 0.08]) + r.normal(0.0, 0.02, 2),
        lateral=lateral,
        dome=0.12 + r.normal(0.0, 0.035) + r.normal(0.0, 0.02, 2),
        corner=r.uniform(2.5, 7.0, 2),
        air=float(0.43 + r.normal(0.0, 0.03)),
        heart=heart,
        knob=np.array([0.10 + r.normal(0.0, 0.015), -0.30 + r.normal(0.0, 0.03),
                       0.065 * math.exp(r.normal(0.0, 0.12))]),
        rib_y0=rib_y0,
        rib_sp=rib_sp,
        rib_growth=float(0.05 + r.normal(0.0, 0.015)),
        rib_curve=np.array([0.70 + r.normal(0.0, 0.12), 0.60 + r.normal(0.0, 0.12),
                            0.60 + r.normal(0.0, 0.18)]),
        rib_n=int(r.integers(9, 12)),
        rib_offset=r.normal(0.0, 0.08, (2, 14)),
        rib_thick=np.clip(0.42 + r.normal(0.0, 0.05, (2, 14)), 0.3, 0.55),
        ant_slope=float(0.40 + r.normal(0.0, 0.06)),
        clav=clav,
        scapula=np.stack([body_w - 0.30 + r.normal(0.0, 0.04, 2), 0.25 + r.normal(0.0, 0.06, 2),
                          -0.25 + r.normal(0.0, 0.07, 2)], axis=1),
        breast=np.stack([np.full(2, r.uniform(0.0, 0.09)), body_w * 0.55 + r.normal(0.0, 0.03, 2),
                         np.full(2, 0.40 + r.normal(0.0, 0.05)), np.full(2, 0.26 * math.exp(r.normal(0.0, 0.12)))],
                        axis=1),
        vessels=_vessel_tree(r, hila),
        texture=_band_limited(r, _TEXTURE_GRID, 4.0, 16.0),
    )


def _sig(x: np.ndarray) -> np.ndarray:
    """Logistic step: soft, anti-aliased edges when x is a distance in units of the edge width."""
    return 0.5 + 0.5 * np.tanh(x)


@dataclass
class _Layers:
    """A patient's canonical (un-acquired) density components at one image size."""

    tissue: np.ndarray  # soft tissue, mediastinum, spine, minus tracheal air
    lung: np.ndarray  # lung field mask in [0, 1], without the heart
    bones: np.ndarray  # ribs, clavicles, scapulae
    fine: np.ndarray  # vessels + texture, visible where there is air
    side: np.ndarray  # lung coordinate: 0 at the mediastinal border, 1 at the lateral wall


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = ((np.arange(size, dtype=np.float32) * 2 + 1) / size - 1).astype(np.float32)
    return np.meshgrid(c, c, indexing="xy")


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of one [H, W] image (sigma in pixels, reflected borders)."""
    half = max(1, int(math.ceil(3.0 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / max(sigma, 1e-3)) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    h, w = img.shape
    padded = np.pad(img, half, mode="reflect")
    rows = sum(t * padded[i:i + h, :] for i, t in enumerate(taps))
    return sum(t * rows[:, i:i + w] for i, t in enumerate(taps)).astype(np.float32)


def _warp(img: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Bilinear resampling of [H, W] at ``theta`` @ (x, y, 1) of each output pixel (border padding)."""
    h, w = img.shape
    X, Y = _grid(w)
    px = ((theta[0, 0] * X + theta[0, 1] * Y + theta[0, 2] + 1) * w - 1) / 2
    py = ((theta[1, 0] * X + theta[1, 1] * Y + theta[1, 2] + 1) * h - 1) / 2
    px, py = np.clip(px, 0, w - 1), np.clip(py, 0, h - 1)
    x0, y0 = np.minimum(px.astype(np.int64), w - 2), np.minimum(py.astype(np.int64), h - 2)
    fx, fy = px - x0, py - y0
    flat = img.ravel()
    i = y0 * w + x0
    top = flat[i] * (1 - fx) + flat[i + 1] * fx
    bottom = flat[i + w] * (1 - fx) + flat[i + w + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _upsample_band_limited(field: np.ndarray, size: int) -> np.ndarray:
    """Exact (sinc) resampling of a band-limited periodic field to size x size by spectrum padding."""
    n = field.shape[0]
    spec = np.fft.fft2(field)
    out = np.zeros((size, size), dtype=complex)
    k = n // 2
    out[:k, :k], out[:k, -k:], out[-k:, :k], out[-k:, -k:] = spec[:k, :k], spec[:k, -k:], spec[-k:, :k], spec[-k:, -k:]
    # Sample at pixel centres, whatever the size, so the field sits on the same anatomy.
    f = np.fft.fftfreq(size)
    shift = np.exp(-2j * np.pi * f * (0.5 * (size / n - 1)))
    out = out * shift[:, None] * shift[None, :]
    return (np.fft.ifft2(out).real * (size / n) ** 2).astype(np.float32)


def _splat_lines(segments: np.ndarray, size: int, width_lo: float, width_hi: float) -> np.ndarray:
    """Line density of the segments whose width lies in [width_lo, width_hi), blurred to that width.

    Points every half pixel along each segment are splatted bilinearly in one pass, then one gaussian
    blur gives the lines their width: far cheaper than a distance field per segment.
    """
    sel = segments[(segments[:, 4] >= width_lo) & (segments[:, 4] < width_hi)].astype(np.float64)
    length_px = np.hypot(sel[:, 2] - sel[:, 0], sel[:, 3] - sel[:, 1]) * size / 2
    counts = np.maximum(2, (length_px / 0.5).astype(np.int64))
    seg = np.repeat(np.arange(len(sel)), counts)
    start = np.cumsum(counts) - counts
    t = (np.arange(len(seg)) - start[seg] + 0.5) / counts[seg]
    px = (sel[seg, 0] + (sel[seg, 2] - sel[seg, 0]) * t + 1) * size / 2 - 0.5
    py = (sel[seg, 1] + (sel[seg, 3] - sel[seg, 1]) * t + 1) * size / 2 - 0.5
    w = (length_px / counts)[seg]
    ix, iy = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    fx, fy = px - ix, py - iy
    jx = np.concatenate([ix, ix + 1, ix, ix + 1])
    jy = np.concatenate([iy, iy, iy + 1, iy + 1])
    wt = np.concatenate([w * (1 - fx) * (1 - fy), w * fx * (1 - fy), w * (1 - fx) * fy, w * fx * fy])
    ok = (jx >= 0) & (jx < size) & (jy >= 0) & (jy < size)
    canvas = np.bincount(jy[ok] * size + jx[ok], weights=wt[ok], minlength=size * size)
    sigma_px = max(0.5, 0.5 * (width_lo + width_hi) * size / 4)
    blurred = _blur(canvas.reshape(size, size).astype(np.float32), sigma_px)
    return blurred * math.sqrt(2 * math.pi) * sigma_px  # peak ~ 1 on a line


def _rib_family(y: np.ndarray, centre: np.ndarray, slope: np.ndarray, y0: float,
                sp: float, growth: float, n: int, offset: np.ndarray, thick: np.ndarray,
                edge: float) -> np.ndarray:
    """Parallel curved bands ``y = y0 + sp * (i + growth * i^2 / 2) + centre(u)``, i < n.

    Evaluated in O(1) per pixel: the continuous rib coordinate of each pixel gives its nearest rib,
    whose own offset and thickness (per-rib identity detail) shape the band. Bones get brighter
    cortical edges.
    """
    w = (y - centre - y0) / sp
    ri = (-1.0 + np.sqrt(np.maximum(1.0 + 2.0 * growth * w, 1e-6))) / growth
    idx = np.clip(np.floor(ri + 0.5).astype(np.int64), 0, n - 1)
    local_sp = sp * (1.0 + growth * idx)
    dist = np.abs(ri - idx - offset[idx]) * local_sp / np.sqrt(1.0 + slope**2)
    half = 0.5 * thick[idx] * local_sp
    valid = (ri > -0.5) & (ri < n - 0.5)
    body = _sig((half - dist) / edge)
    cortex = np.exp(-(((dist - half) / (1.2 * edge)) ** 2))
    return np.where(valid, 0.07 * body + 0.05 * cortex, 0.0).astype(np.float32)


def _patient_layers(a: Anatomy, size: int) -> _Layers:
    X, Y = _grid(size)
    edge = np.float32(2.0 / size)  # one pixel, in normalised units
    # Body outline: a neck above the shoulders, a cylinder-like thickness profile.
    shoulder = np.exp(-(((Y - a.shoulder_y) / 0.10) ** 2))
    chest_w = a.body_w * (1.0 - 0.06 * (Y - 0.2) ** 2)
    half_w = np.where(Y < a.shoulder_y, a.neck_w + (chest_w - a.neck_w) * shoulder, chest_w)
    body = _sig((half_w - np.abs(X)) / (1.5 * edge))
    thickness = np.sqrt(np.clip(1.0 - (X / half_w) ** 2, 0.0, 1.0))
    tissue = a.tissue * body * (0.45 + 0.55 * thickness)
    tissue += 0.20 * np.exp(-0.5 * ((X - a.spine_x) / 0.10) ** 2) * body  # mediastinum
    vertebrae = 0.8 + 0.2 * np.tanh(3.0 * np.cos(2 * np.pi * (Y / a.vert_h - a.vert_phase)))
    tissue += 0.22 * _sig((a.spine_w - np.abs(X - a.spine_x)) / edge) * vertebrae * body
    trachea = _sig((a.trachea_w - np.abs(X - a.trachea_x)) / edge) * _sig((a.carina_y - Y) / edge)
    tissue -= 0.18 * trachea

    lung = np.zeros_like(X)
    side = np.zeros_like(X)
    bones = np.zeros_like(X)
    for k, s in enumerate((-1.0, 1.0)):
        u = s * X
        med, lat = a.medial[k], a.lateral[k]
        uc, hw = 0.5 * (med + lat), 0.5 * (lat - med)
        yc, hh = 0.5 * (a.apex[k] + a.base[k]), 0.5 * (a.base[k] - a.apex[k])
        du, dv = np.abs(u - uc) / hw, (Y - yc) / hh
        p = np.where(dv < 0, 2.0, a.corner[k]).astype(np.float32)
        rad = (du**p + np.abs(dv) ** p) ** (1.0 / p)
        field = _sig((1.0 - rad) * min(hw, hh) / edge)
        rel = np.clip((u - med) / (lat - med), 0.0, 1.0)
        dome_y = a.base[k] - a.dome[k] * np.exp(-(((rel - 0.4) / 0.45) ** 2))
        field = field * _sig((dome_y - Y) / edge)
        lung += field
        side = np.where(u > 0, rel, side)

        # Posterior ribs from the spine, anterior ribs from the lateral wall down to the cartilage.
        us = np.maximum(u - s * a.spine_x - a.spine_w, 0.0)
        c1, c2, c3 = a.rib_curve
        centre = -c1 * us + c2 * us**2 + c3 * us**3
        slope = -c1 + 2 * c2 * us + 3 * c3 * us**2
        post = _rib_family(Y, centre, slope, a.rib_y0[k], a.rib_sp[k], a.rib_growth, a.rib_n,
                           a.rib_offset[k], a.rib_thick[k], edge)
        post *= _sig((u - s * a.spine_x - 0.6 * a.spine_w) / edge) * _sig((a.body_w - 0.04 - u) / (2 * edge))
        ant_centre = a.ant_slope * np.maximum(lat + 0.05 - u, 0.0) ** 1.3
        ant = _rib_family(Y, ant_centre, -a.ant_slope * np.ones_like(u), a.rib_y0[k] + 0.30,
                          a.rib_sp[k] * 1.2, a.rib_growth, a.rib_n - 3, a.rib_offset[k, ::-1],
                          a.rib_thick[k, ::-1] * 0.8, edge)
        ant *= 0.55 * _sig((u - 0.30) / (3 * edge)) * _sig((a.body_w - 0.04 - u) / (2 * edge))
        # Clavicle: a gently arched band rising from the sternal end towards the shoulder.
        cy, ang, length, bend = a.clav[k]
        t = (u - 0.07) / (length * math.cos(ang))
        cl_centre = cy - math.tan(ang) * (u - 0.07) - bend * np.sin(np.pi * np.clip(t, 0, 1))
        cl_dist = np.abs(Y - cl_centre)
        clav = _sig((0.04 - cl_dist) / edge) * 0.15 + 0.07 * np.exp(-(((cl_dist - 0.04) / edge) ** 2))
        clav *= _sig(t * length / edge) * _sig((1.0 - t) * length / edge)
        # Scapula: a faint plate lateral of its medial border, over the upper lateral lung.
        top, lean, tip = a.scapula[k]
        border = top + lean * (Y - a.shoulder_y)
        scap = (0.05 * _sig((u - border) / (1.5 * edge)) * _sig((tip - Y) / (4 * edge))
                * _sig((Y - a.shoulder_y) / edge))
        # Breast / pectoral soft tissue over the lower zones.
        dens, bx, by, br = a.breast[k]
        tissue += dens * body * _sig((br - np.hypot(u - bx, (Y - by) * 1.3)) / (6 * edge))
        bones += scap * body
        bones += (post + ant) * body * (0.4 + 0.6 * _sig((a.base[k] + 0.03 - Y) / 0.04)) + clav

    knob = _sig((a.knob[2] - np.hypot(X - a.knob[0], Y - a.knob[1])) / edge)
    lung = np.clip(lung, 0.0, 1.0) * (1.0 - knob)
    fine = 0.10 * _splat_lines(a.vessels, size, 0.016, 0.04) + 0.09 * _splat_lines(a.vessels, size, 0.0, 0.016)
    tex = _upsample_band_limited(a.texture, size)
    fine += 0.025 * tex
    bones *= 1.0 + 0.25 * tex  # trabecular texture
    return _Layers(tissue.astype(np.float32), lung.astype(np.float32), bones.astype(np.float32),
                   fine.astype(np.float32), side.astype(np.float32))


def _ellipse(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, rx: float, ry: float, tilt: float,
             edge: float) -> np.ndarray:
    c, s = math.cos(tilt), math.sin(tilt)
    dx, dy = X - cx, Y - cy
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    return _sig((1.0 - np.sqrt(u * u + v * v)) * min(rx, ry) / edge)


def _image_density(a: Anatomy, layers: _Layers, r: np.random.Generator, labels: np.ndarray,
                   size: int) -> np.ndarray:
    """Canonical density of one image: the patient's layers, this image's heart and findings."""
    X, Y = _grid(size)
    edge = 2.0 / size
    hx, hy, hrx, hry, tilt = a.heart
    phase = math.exp(r.normal(0.0, 0.025))  # cardiac phase
    grow_x, grow_y, shift = 1.0, 1.0, 0.0
    if labels[2]:  # cardiomegaly, relative to this patient's own baseline heart
        grow_x, grow_y, shift = r.uniform(1.22, 1.38), r.uniform(1.05, 1.15), 0.03
    heart = _ellipse(X, Y, hx + shift, hy + 0.5 * shift, hrx * phase * grow_x, hry * phase * grow_y, tilt, edge)
    air = layers.lung * (1.0 - heart)

    def lung_point(k: int, t_u: float, t_y: float) -> tuple[float, float]:
        s = -1.0 if k == 0 else 1.0
        u = a.medial[k] + t_u * (a.lateral[k] - a.medial[k])
        y = a.apex[k] + t_y * (a.base[k] - a.dome[k] - a.apex[k])
        return s * u, y

    if labels[0]:  # nodule
        k = int(r.integers(0, 2))
        t_u = r.uniform(0.5, 0.85) if k == 1 else r.uniform(0.25, 0.85)
        nx, ny = lung_point(k, t_u, r.uniform(0.2, 0.85))
        rad = r.uniform(0.06, 0.09)
        dist = np.hypot(X - nx, Y - ny)
        air = air * (1.0 - 0.9 * _sig((rad - dist) / (1.5 * edge)))
    if labels[1]:  # effusion: fluid with a meniscus rising along the lateral wall
        sides = [[0], [1], [0, 1]][int(r.choice(3, p=[0.4, 0.4, 0.2]))]
        for k in sides:
            s = -1.0 if k == 0 else 1.0
            height = r.uniform(0.2, 0.36)
            rel = layers.side
            surface = a.base[k] - height * (0.65 + 0.35 * rel**2)
            fluid = _sig((Y - surface) / (4 * edge)) * _sig(s * X / edge)
            air = air * (1.0 - 0.92 * fluid)
    if labels[3]:  # opacity: an irregular consolidation patch in one lung zone
        k = int(r.integers(0, 2))
        t_u = r.uniform(0.45, 0.8) if k == 1 else r.uniform(0.3, 0.75)
        ox, oy = lung_point(k, t_u, r.choice([0.22, 0.5, 0.75]) + r.normal(0.0, 0.05))
        patch = np.zeros_like(X)
        for _ in range(4):
            sx = r.uniform(0.06, 0.11)
            px, py = ox + r.normal(0.0, 0.05), oy + r.normal(0.0, 0.05)
            patch += np.exp(-0.5 * ((X - px) ** 2 + (Y - py) ** 2) / sx**2)
        air = air * (1.0 - r.uniform(0.55, 0.75) * np.clip(patch, 0.0, 1.0))
    return layers.tissue + layers.bones - a.air * air + layers.fine * air


def _acquisition_theta(r: np.random.Generator) -> np.ndarray:
    """Output->canonical affine (2x3, normalised coords) of one acquisition's pose and breath."""
    rot = math.radians(float(np.clip(r.normal(0.0, 2.0), -5.0, 5.0)))
    scale = float(np.clip(1.0 + r.normal(0.0, 0.025), 0.93, 1.07))
    tx, ty = np.clip(r.normal(0.0, 0.02, 2), -0.06, 0.06)
    breath = float(np.clip(1.0 + r.normal(0.0, 0.03), 0.92, 1.08))
    inspire = np.array([[1.0, 0.0, 0.0], [0.0, breath, _INSPIRATION_PIVOT * (1 - breath)], [0, 0, 1]])
    c, s = math.cos(rot) * scale, math.sin(rot) * scale
    pose = np.array([[c, -s, tx], [s, c, ty], [0, 0, 1]])
    return np.linalg.inv(pose @ inspire)[:2]


def _acquire(density: np.ndarray, thetas: np.ndarray, profile: ScannerProfile,
             acq: np.ndarray, noise: np.ndarray, size: int) -> np.ndarray:
    """Pose, expose and render a batch of canonical densities through the site's scanner.

    ``acq`` rows: exposure factor, gamma factor, window shift, blur factor, noise factor,
    collimation factor.
    """
    lo, hi = profile.window
    centre = np.abs((np.arange(size) * 2 + 1) / size - 1).astype(np.float32)
    out = np.empty_like(density)
    for j, (exposure, gamma, shift, blur, noisiness, collimation) in enumerate(acq):
        d = np.maximum(_warp(density[j], thetas[j]), 0.0)
        img = 1.0 - np.exp(-_MU * profile.exposure * exposure * d)
        img = np.clip((img - lo - shift) / (hi - lo), 0.0, 1.0) ** (profile.gamma * gamma) + profile.offset
        img = _blur(img, profile.blur * blur * size / 128)
        img = img + profile.noise * noisiness * np.sqrt(np.maximum(img, 0.0) + 0.1) * noise[j]
        if profile.collimation > 0:
            inside = _sig((1.0 - profile.collimation * collimation - centre) / (3.0 / size))
            mask = inside[:, None] * inside[None, :]
            img = img * mask + 0.03 * (1.0 - mask)
        out[j] = np.clip(img, 0.0, 1.0)
    return out


def _check(cfg: DataConfig) -> None:
    if not isinstance(cfg.image_size, (int, np.integer)) or not MIN_SIZE <= cfg.image_size <= MAX_SIZE:
        raise ValueError(f"synthetic data: image_size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], "
                         f"got {cfg.image_size!r}")
    if not 1 <= cfg.n_sites <= MAX_SITES:
        raise ValueError(f"synthetic data: n_sites must lie in [1, {MAX_SITES}], got {cfg.n_sites}")
    if not 0 <= cfg.patients_per_site < SITE_ID_STRIDE or cfg.test_patients < 0:
        raise ValueError("synthetic data: patients_per_site must lie in [0, 100000) and test_patients be >= 0")
    if cfg.images_per_patient < 1:
        raise ValueError(f"synthetic data: images_per_patient must be >= 1, got {cfg.images_per_patient}")


def _patients(cfg: DataConfig, keys: list[tuple[int, int, int, int]], anatomy_stream: int,
              image_stream: int) -> ImageSet:
    """Render patients given as (patient id, profile site, seed site, index within the seed site)."""
    size, m = cfg.image_size, cfg.images_per_patient
    n = len(keys) * m
    images = np.empty((n, size, size), dtype=np.float32)
    labels = np.zeros((n, len(FINDINGS)), dtype=np.float32)
    profiles: dict[int, ScannerProfile] = {}
    for p, (_, site, seed_site, index) in enumerate(keys):
        profile = profiles.setdefault(site, site_profile(cfg.seed, site))
        anat = _anatomy(_rng(cfg.seed, anatomy_stream, seed_site, index), profile)
        layers = _patient_layers(anat, size)
        dens = np.empty((m, size, size), dtype=np.float32)
        thetas = np.empty((m, 2, 3), dtype=np.float32)
        acq = np.empty((m, 6), dtype=np.float32)
        noise = np.empty((m, size, size), dtype=np.float32)
        for j in range(m):
            r = _rng(cfg.seed, image_stream, seed_site, index, j)
            lab = r.random(len(FINDINGS)) < profile.prevalence
            labels[p * m + j] = lab
            dens[j] = _image_density(anat, layers, r, lab, size)
            thetas[j] = _acquisition_theta(r)
            acq[j] = [math.exp(r.normal(0, 0.06)), math.exp(r.normal(0, 0.05)), r.normal(0, 0.015),
                      math.exp(r.normal(0, 0.15)), math.exp(r.normal(0, 0.2)), math.exp(r.normal(0, 0.15))]
            noise[j] = r.standard_normal((size, size), dtype=np.float32)
        images[p * m:(p + 1) * m] = _acquire(dens, thetas, profile, acq, noise, size)
    return ImageSet(
        images=images,
        patient_ids=np.repeat(np.array([k[0] for k in keys], dtype=np.int64), m),
        labels=labels,
        finding_names=FINDINGS,
        sites=np.repeat(np.array([k[1] for k in keys], dtype=np.int64), m),
    )


def generate_site(cfg: DataConfig, site: int) -> ImageSet:
    """The training images of hospital ``site`` (0-based): ``patients_per_site`` x ``images_per_patient``."""
    _check(cfg)
    if not 0 <= site < cfg.n_sites:
        raise ValueError(f"site {site} outside [0, {cfg.n_sites})")
    keys = [(site * SITE_ID_STRIDE + k, site, site, k) for k in range(cfg.patients_per_site)]
    return _patients(cfg, keys, _STREAM_ANATOMY, _STREAM_IMAGE)


def generate_test(cfg: DataConfig) -> ImageSet:
    """Held-out patients (ids from 10000000), patient ``k`` from the population and scanner of site
    ``k % n_sites``; their ``sites`` entry is that site."""
    _check(cfg)
    keys = [(TEST_ID_BASE + k, k % cfg.n_sites, 0, k) for k in range(cfg.test_patients)]
    return _patients(cfg, keys, _STREAM_TEST_ANATOMY, _STREAM_TEST_IMAGE)


def generate(cfg: DataConfig) -> tuple[list[ImageSet], ImageSet]:
    """Every site's training data and the shared held-out test set."""
    return [generate_site(cfg, s) for s in range(cfg.n_sites)], generate_test(cfg)
