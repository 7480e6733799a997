"""Identity blocking: the blocked fraction is the level, and the most salient patches go first."""

import numpy as np
import pytest
import torch

from fedeid.deid.blocking import block_mask, gumbel_perturb, patch_grid, patch_scores


@pytest.mark.parametrize("level", [0.0, 0.1, 0.25, 0.5, 0.73, 1.0])
def test_blocked_fraction_matches_level(level):
    scores = torch.rand(5, 64)
    mask = block_mask(scores, level, image_size=64, patch_size=8)
    assert mask.shape == (5, 1, 64, 64)
    frac = mask.flatten(1).mean(1)
    # round(level * P) patches of P = 64: within half a patch of the level
    assert torch.all((frac - level).abs() <= 0.5 / 64 + 1e-6)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_most_salient_patches_are_blocked_first():
    scores = torch.arange(16, dtype=torch.float32)[None]  # patch 15 most identity-relevant
    mask = block_mask(scores, 0.25, image_size=32, patch_size=8)  # 4 of 16 patches
    blocked = mask[0, 0, ::8, ::8].flatten()
    assert blocked.tolist() == [0.0] * 12 + [1.0] * 4


def test_blocking_is_nested_as_level_rises():
    scores = torch.rand(3, 64)
    masks = [block_mask(scores, lv, 64, 8) for lv in (0.2, 0.4, 0.6, 0.8)]
    for lo, hi in zip(masks, masks[1:]):
        assert torch.all(hi >= lo)


def test_per_image_levels():
    scores = torch.rand(2, 16)
    mask = block_mask(scores, torch.tensor([0.0, 1.0]), 16, 4)
    assert mask[0].sum() == 0 and mask[1].mean() == 1


def test_randomised_mask_blocks_each_patch_with_its_softmax_probability():
    """Known answer of the Gumbel-top-k trick: blocking one of four patches picks patch i with
    probability exp(s_i / T) / sum_j exp(s_j / T)."""
    scores = torch.tensor([[2.0, 1.0, 0.0, 0.0]]).expand(20000, 4)
    temperature = 1.0
    mask = block_mask(gumbel_perturb(scores, temperature, torch.Generator().manual_seed(0)), 0.25, 8, 4)
    freq = mask[:, 0, ::4, ::4].flatten(1).mean(0)
    expected = torch.softmax(scores[0] / temperature, dim=0)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)
    assert torch.all(mask.flatten(1).sum(1) == 16)  # always exactly one 4x4 patch


def test_randomised_masks_differ_per_draw_but_keep_the_level():
    scores = torch.rand(1, 64).expand(2, 64)  # one image's relevance, released twice
    perturbed = gumbel_perturb(scores, 1.0, torch.Generator().manual_seed(3))
    again = gumbel_perturb(scores, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(perturbed, again)  # a release seed reproduces its mask
    mask = block_mask(perturbed, 0.5, 64, 8)
    assert not torch.equal(mask[0], mask[1])
    assert torch.all(mask.flatten(1).mean(1) == 0.5)
    assert torch.equal(gumbel_perturb(scores, 0.0), scores)  # temperature 0: the deterministic ranking
    with pytest.raises(ValueError, match="temperature"):
        gumbel_perturb(scores, -1.0)


def test_patch_scores_average_saliency_per_patch():
    sal = torch.zeros(1, 1, 4, 4)
    sal[0, 0, 0, 0] = 1.0
    scores = patch_scores(sal, image_size=16, patch_size=4)
    assert scores.shape == (1, 16)
    assert int(scores.argmax()) == 0


def test_bad_levels_and_patch_sizes_are_refused():
    with pytest.raises(ValueError, match="level"):
        block_mask(torch.rand(1, 16), 1.5, 16, 4)
    with pytest.raises(ValueError, match="divide"):
        patch_grid(64, 7)


def test_matchability_finds_the_patch_that_identifies_patients():
    """Patients differ only in patch 0's texture, elsewhere every image is independent noise:
    patch 0 must score highest, and far above the rest."""
    from fedeid.deid.blocking import cohort_matchability

    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(6), 3)
    images = rng.random((18, 1, 32, 32)).astype(np.float32)
    fingerprints = rng.random((6, 8, 8)).astype(np.float32)
    images[:, 0, :8, :8] = fingerprints[ids] + 0.05 * rng.standard_normal((18, 8, 8)).astype(np.float32)
    m = cohort_matchability(torch.from_numpy(images), ids, 8, shift=2, others=5)
    assert m.shape == (16,) and int(m.argmax()) == 0
    assert m[0] > 0.5 and m[1:].abs().max() < 0.3


def test_matchability_without_repeat_patients_is_zero():
    from fedeid.deid.blocking import cohort_matchability

    m = cohort_matchability(torch.rand(4, 1, 16, 16), np.arange(4), 8)
    assert torch.equal(m, torch.zeros(4))


def test_relevance_ranks_saliency_and_matchability_together():
    from fedeid.deid.blocking import combine_relevance

    saliency = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.equal(combine_relevance(saliency, None, 1.0).argmax(1), torch.tensor([0]))
    matchable = torch.tensor([0.0, 0.0, 0.0, 5.0])
    both = combine_relevance(saliency, matchable, 2.0)
    assert int(both.argmax()) == 3  # the matcher's patch goes first at this weight
    assert torch.equal(combine_relevance(saliency, matchable, 0.0), combine_relevance(saliency, None, 1.0))
