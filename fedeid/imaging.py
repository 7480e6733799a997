"""Resizing and filtering of images: one place for them.

Every size change in fedeid goes through here (loaders, networks, the de-identifier, the DICOM
pixel path), so down- and up-sampling behave identically wherever an image travels; so do the
low-pass and the mask feathering of the de-identifier's re-rendering, at the model's size and
at native resolution alike.
"""

from __future__ import annotations

import math

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


def gaussian_blur(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Separable Gaussian low-pass of [B, C, H, W] with one sigma (pixels) per image, or one for all.

    Per-image sigmas let one batch mix privacy levels (training samples a level per image); a
    sigma of 0 is the identity exactly. Reflect padding keeps the image border from darkening.
    No parameters: under per-sample DP-SGD it is plain arithmetic between layers.
    """
    b, c, h, w = x.shape
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(b)
    radius = int(math.ceil(3.0 * float(s.max()))) if b else 0
    radius = min(radius, h - 1, w - 1)
    if radius <= 0:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t[None] / s[:, None].clamp(min=1e-6)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # sigma 0 -> a delta
    kernel = kernel.repeat_interleave(c, dim=0)  # [B*C, K]
    y = F.pad(x.reshape(1, b * c, h, w), [radius] * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    return y.reshape(b, c, h, w)


def feather(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Binary block mask [B, 1, H, W] -> a soft blending weight that is 1 wherever the mask is.

    The mask is dilated by two sigmas before the blur, so the weight reaches ~1 at the blocked
    edge (no step there: no seam) and falls to 0 over about four sigmas into the visible side;
    the final maximum keeps every blocked pixel purely synthetic (nothing of the original leaks
    into a blocked patch through the blend).
    """
    r = int(math.ceil(2.0 * sigma))
    if r <= 0:
        return mask
    grown = F.max_pool2d(mask, 2 * r + 1, stride=1, padding=r)
    return torch.maximum(mask, gaussian_blur(grown, sigma))


def compose_native(native: np.ndarray, small_in: np.ndarray, small_out: np.ndarray, small_mask: np.ndarray,
                   sigma: float, feather_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """A de-identification made at the model's size -> the same at the native image's resolution.

    ``native`` [H, W] is the original, ``small_in`` it at the model's size, ``small_out`` the
    model's output, ``small_mask`` the blocked patches, ``sigma`` the visible low-pass at the
    model's size. The output is the upsampled synthesis plus, outside the (feathered) blocked
    patches, the native detail the model's size cannot hold, low-passed at ``sigma`` scaled to
    native pixels: the release keeps the native sharpness the level allows, and no more.
    Returns (image [H, W] in [0, 1], blocked mask [H, W] bool).
    """
    shape = tuple(native.shape)
    scale = 0.5 * (shape[0] / small_in.shape[0] + shape[1] / small_in.shape[1])

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]

    synth, mask_native = upsample_result(small_out, small_mask, shape)
    detail = gaussian_blur(t(native), sigma * scale) - resize(gaussian_blur(t(small_in), sigma), shape)
    visible = 1 - resize(feather(t(small_mask), feather_sigma), shape)
    return (t(synth) + visible * detail)[0, 0].clamp(0, 1).numpy(), mask_native


def normalised_blur(x: torch.Tensor, weight: torch.Tensor, sigma: float | torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised convolution: the Gaussian average of ``x`` over the pixels where ``weight`` is 1.

    Returns (average, blurred weight); where the blurred weight is 0 the average is 0. The
    de-identifier low-passes visible regions this way, so no blocked pixel bleeds into them.
    """
    w = gaussian_blur(weight, sigma)
    return gaussian_blur(x * weight, sigma) / w.clamp(min=1e-6), w
