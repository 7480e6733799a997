"""The de-identifier's filters: the level-tied low-pass, the feathered mask, native composition."""

import numpy as np
import torch

from fedeid.imaging import compose_native, feather, gaussian_blur


def test_blur_is_exact_identity_at_zero_and_per_image():
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(gaussian_blur(x, 0.0), x)
    y = gaussian_blur(x, torch.tensor([0.0, 2.0]))
    assert torch.equal(y[0], x[0])  # sigma 0 in a mixed batch: a delta kernel
    assert y[1].std() < 0.5 * x[1].std()  # white noise loses most of its energy
    assert torch.allclose(y[1].mean(), x[1].mean(), atol=0.02)  # a low-pass keeps the mean


def test_feather_covers_the_mask_and_has_no_step_at_its_border():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:16, 8:16] = 1
    soft = feather(mask, 1.5)
    assert torch.all(soft[mask > 0] == 1)  # blocked pixels stay purely synthetic
    assert soft[0, 0, 12, 16] > 0.9  # the first visible pixel: no jump from 1
    assert soft[0, 0, 12, 30] < 0.01  # far away: the re-rendered image
    assert soft.diff(dim=-1).abs().max() < 0.4


def test_native_composition_keeps_the_synthesis_and_lowpasses_visible_detail():
    rng = np.random.default_rng(0)
    native = rng.random((96, 96), dtype=np.float32)
    small_in = native[::3, ::3].copy()
    small_mask = np.zeros((32, 32), bool)
    small_mask[:16] = True
    small_out = np.full((32, 32), 0.5, np.float32)
    out, mask = compose_native(native, small_in, small_out, small_mask, sigma=1.0, feather_sigma=1.0)
    assert out.shape == native.shape and mask[:48].all() and not mask[48:].any()
    assert np.abs(out[:40] - 0.5).max() < 1e-5  # blocked: the synthesis only
    assert out[60:].std() < 0.5 * native[60:].std()  # visible: no native fine texture survives



def test_visible_lowpass_takes_nothing_from_blocked_pixels():
    from fedeid.imaging import normalised_blur

    x = torch.zeros(1, 1, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1
    x[..., :, 16:] = 1.0  # bright blocked content next to a dark visible half
    low, _ = normalised_blur(x, 1 - mask, 3.0)
    assert torch.equal(low[..., :, :16], torch.zeros(1, 1, 32, 16))
