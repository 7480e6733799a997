"""Identity blocking: rank patches by identity relevance and block the top ``level`` fraction.

Identity relevance is the site ReID network's Grad-CAM saliency combined with the patch
matchability measured on the site's own cohort (:func:`cohort_matchability`).

``level`` is the privacy knob: the number of blocked patches is ``round(level * n_patches)``,
so the blocked fraction equals the level to within half a patch (0 blocks nothing, 1 blocks
everything) whatever the saliency looks like.

Which patches are blocked is drawn per release (:func:`gumbel_perturb`), not fixed: a
deterministic top-k mask is a function of the patient's anatomy, and the mask layout alone
linked two acquisitions of one patient (P@1 0.38-0.62 at levels 0.2-0.8, chance 0.033), which is
how a model holder re-identified mid-level releases.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedeid.models.reid import ReIDNet


def patch_grid(image_size: int, patch_size: int) -> int:
    if patch_size <= 0 or image_size % patch_size:
        raise ValueError(f"patch size {patch_size} must divide the image size {image_size}")
    return image_size // patch_size


def patch_scores(saliency: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """Saliency [B, 1, h, w] at any resolution -> mean relevance per patch [B, g*g]."""
    sal = F.interpolate(saliency, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return F.avg_pool2d(sal, patch_size).flatten(1)


def gumbel_perturb(scores: torch.Tensor, temperature: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Scores [B, P] plus ``temperature`` x standard Gumbel noise (drawn on the CPU from ``generator``).

    The top k of the result is a sample of k patches without replacement, each draw picking a
    patch with probability proportional to ``exp(score / temperature)`` (the Gumbel-top-k
    trick): identity-relevant patches are still blocked first on average, but two releases of
    one image, or two images of one patient, get different masks. Temperature 0 is the
    deterministic ranking.
    """
    if temperature < 0:
        raise ValueError(f"mask temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return scores
    u = torch.rand(scores.shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))
    return scores + temperature * gumbel.to(device=scores.device, dtype=scores.dtype)


def block_mask(scores: torch.Tensor, level: float | torch.Tensor, image_size: int,
               patch_size: int) -> torch.Tensor:
    """Mask [B, 1, H, W], 1 on the ``round(level * P)`` highest-scoring patches of each image.

    Releases pass scores perturbed by :func:`gumbel_perturb`, so this top k is a random draw.

    ``level`` is a float or a per-image tensor [B] (training samples one level per image).
    """
    g = patch_grid(image_size, patch_size)
    n = scores.shape[1]
    if n != g * g:
        raise ValueError(f"{n} patch scores for a {g}x{g} grid")
    level_t = torch.as_tensor(level, dtype=torch.float32, device=scores.device).reshape(-1)
    if bool(((level_t < 0) | (level_t > 1)).any()):
        raise ValueError(f"level must lie in [0, 1], got {level}")
    k = torch.round(level_t * n).long().expand(scores.shape[0])
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = most identity-relevant
    blocked = (rank < k[:, None]).float().reshape(-1, 1, g, g)
    return F.interpolate(blocked, scale_factor=patch_size, mode="nearest")


def _unit_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, 1, H, W] -> zero-mean, unit-norm patches [N, P, D] (flat patches stay zero)."""
    p = F.unfold(x, patch_size, stride=patch_size).transpose(1, 2)
    p = p - p.mean(-1, keepdim=True)
    return p / p.norm(dim=-1, keepdim=True).clamp(min=1e-3)


@torch.no_grad()
def cohort_matchability(images: torch.Tensor, patient_ids: np.ndarray, patch_size: int, *,
                        shift: int = 4, others: int = 16, seed: int = 0) -> torch.Tensor:
    """How well each patch location re-identifies a patient by plain matching, on a site's cohort [P].

    For every image and patch, the best normalised cross-correlation (over shifts of up to
    ``shift`` px, the acquisitions' jitter) with the same patient's other images, minus the best
    with ``others`` images of other patients; averaged over the cohort. High where a matcher that
    needs no network finds the patient, low where every patient looks alike. It costs one pass of
    NCC and needs no identity network, so it is as strong at a site with a few dozen patients as
    at a large one. Patients with one image contribute nothing (no same-patient pair).
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    n = len(x)
    ids = np.asarray(patient_ids)
    rng = np.random.default_rng(seed)
    pairs_same, pairs_other = [], []
    for i in range(n):
        same = np.flatnonzero((ids == ids[i]) & (np.arange(n) != i))
        other = np.flatnonzero(ids != ids[i])
        if len(same) == 0 or len(other) == 0:
            continue
        pairs_same += [(i, j) for j in same]
        pairs_other += [(i, j) for j in rng.choice(other, min(others, len(other)), replace=False)]
    grid = (x.shape[-1] // patch_size) ** 2
    if not pairs_same:
        return torch.zeros(grid)
    ps, po = torch.as_tensor(pairs_same), torch.as_tensor(pairs_other)
    query = _unit_patches(x, patch_size)
    padded = F.pad(x, [shift] * 4, mode="replicate")
    best_same = torch.full((len(ps), grid), -1.0)
    best_other = torch.full((len(po), grid), -1.0)
    h, w = x.shape[-2:]
    for dy in range(0, 2 * shift + 1, 2):
        for dx in range(0, 2 * shift + 1, 2):
            shifted = _unit_patches(padded[..., dy:dy + h, dx:dx + w], patch_size)
            for pairs, best in ((ps, best_same), (po, best_other)):
                for c in range(0, len(pairs), 256):  # bounded memory: [256, P, D] at a time
                    i, j = pairs[c:c + 256, 0], pairs[c:c + 256, 1]
                    torch.maximum(best[c:c + 256], (query[i] * shifted[j]).sum(-1), out=best[c:c + 256])
    same_i = torch.full((n, grid), -1.0).scatter_reduce_(0, ps[:, :1].expand(-1, grid), best_same, "amax")
    other_i = torch.full((n, grid), -1.0).scatter_reduce_(0, po[:, :1].expand(-1, grid), best_other, "amax")
    used = torch.zeros(n, dtype=torch.bool)
    used[ps[:, 0]] = True
    return (same_i - other_i)[used].mean(0)


def rank_unit(scores: torch.Tensor) -> torch.Tensor:
    """Scores [B, P] -> their ranks scaled to [0, 1] (1 = highest): comparable across sources."""
    return scores.argsort(dim=1).argsort(dim=1).float() / max(scores.shape[1] - 1, 1)


def combine_relevance(saliency_scores: torch.Tensor, matchability: torch.Tensor | None,
                      weight: float) -> torch.Tensor:
    """Per-image ReID saliency [B, P] and the cohort's matchability [P] -> identity relevance [B, P].

    The saliency becomes ranks in [0, 1] (its scale depends on the network and the image); the
    matchability is scaled by its largest value, not ranked, so the many patches no matcher can
    use (margins near 0) stay near 0 instead of being spread by noise. Saliency says what a CNN
    attends to, matchability what a matcher can match: a patch high on either goes first.
    """
    rel = rank_unit(saliency_scores)
    if matchability is None or weight <= 0:
        return rel
    m = matchability.to(rel.device).clamp(min=0)
    if bool(m.max() <= 0):
        return rel
    return rel + weight * (m / m.max()).reshape(1, -1)


def identity_relevance(reid: ReIDNet, x: torch.Tensor, image_size: int, patch_size: int,
                       weight: float) -> torch.Tensor:
    """Images [B, 1, S, S] -> identity relevance per patch [B, P]: what blocking ranks.

    The site's network carries its cohort's matchability (computed when it was trained); an
    attacker-style network without it ranks by saliency alone.
    """
    scores = patch_scores(reid.saliency(x), image_size, patch_size)
    return combine_relevance(scores, reid.matchability, weight)
