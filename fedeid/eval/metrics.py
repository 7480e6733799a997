"""Privacy, utility and image-quality metrics (method.md, A.5).

* Privacy: how well an attacker re-identifies de-identified images against a gallery of
  originals — :func:`similarity_metrics` on any attacker's query × gallery similarity matrix
  (P@1, mAP@R, verification AUC, TPR at a fixed FPR, and the chance level); :func:`reid_metrics`
  for embeddings compared by cosine similarity.
* Utility: :func:`macro_auc` / :func:`per_finding_auc` of a downstream multi-label classifier.
* Quality: :func:`psnr` and :func:`ssim` (Wang et al. 2004) between originals and outputs.

Retrieval metrics are tie-aware: a de-identifier that maps every image to the same embedding
must score exactly chance, not whatever the gallery order happens to give ``argmax``. Ties are
therefore resolved in expectation over a uniformly random order of the tied gallery items.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

# Cosine similarities equal after rounding to this many decimals are ties: identical embeddings
# can differ in the last bits depending on how the BLAS kernel blocks the product.
_TIE_DECIMALS = 10


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def cosine_similarity(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix [Q, G] in float64; zero vectors get similarity 0 to everything."""
    q = query.astype(np.float64).reshape(len(query), -1)
    g = gallery.astype(np.float64).reshape(len(gallery), -1)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return q @ g.T


def _query_scores(sims: np.ndarray, relevant: np.ndarray) -> tuple[float, float]:
    """Expected P@1 and AP@R of one query, over random orders of tied similarities.

    ``sims`` are the query's similarities to the usable gallery items, ``relevant`` marks its
    patient's items; R = ``relevant.sum()`` > 0. AP@R (Musgrave et al. 2020) is
    ``(1/R) * sum_{i<=R} P(i) * rel(i)`` over the R best-ranked items. Inside a tie group of
    ``t`` items holding ``k`` relevant ones, placed after ``s`` items of which ``c`` are relevant,
    position ``j`` is relevant with probability ``k/t`` and, given that, the group's earlier
    ``j-1`` positions hold ``(j-1)(k-1)/(t-1)`` relevant items in expectation; linearity of
    expectation then gives the exact expected AP@R. Without ties this is the usual AP@R.
    """
    r = int(relevant.sum())
    order = np.argsort(-sims, kind="stable")
    s_sorted, rel_sorted = sims[order], relevant[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    ends = np.r_[starts[1:], len(s_sorted)]
    p_at_1 = float(rel_sorted[starts[0]:ends[0]].mean())
    ap = 0.0
    seen_relevant = 0
    for start, end in zip(starts, ends):
        if start >= r:
            break
        t = end - start
        k = int(rel_sorted[start:end].sum())
        if k:
            j = np.arange(1, min(t, r - start) + 1)
            inner = (j - 1) * (k - 1) / (t - 1) if t > 1 else np.zeros(len(j))
            ap += float(np.sum((k / t) * (seen_relevant + 1 + inner) / (start + j)))
        seen_relevant += k
    return p_at_1, ap / r


def reid_metrics(
    query_emb: Any,
    query_ids: Any,
    gallery_emb: Any,
    gallery_ids: Any,
    query_keys: Any | None = None,
    gallery_keys: Any | None = None,
) -> dict[str, float | int]:
    """Re-identification success of ``query`` embeddings against a ``gallery``, by cosine similarity.

    The attacker ranks gallery items by cosine similarity to each query; the figures are those of
    :func:`similarity_metrics` on that matrix. ``query_keys`` / ``gallery_keys`` (given together)
    exclude pairs whose keys are equal — e.g. the acquisition or source file — so a de-identified
    image is not matched against its own original when the gallery holds it.
    """
    q_emb, g_emb = _to_numpy(query_emb), _to_numpy(gallery_emb)
    if len(q_emb) != len(_to_numpy(query_ids).reshape(-1)) or len(g_emb) != len(_to_numpy(gallery_ids).reshape(-1)):
        raise ValueError("embeddings and ids must have the same number of rows")
    if (query_keys is None) != (gallery_keys is None):
        raise ValueError("give both query_keys and gallery_keys, or neither")
    usable = None
    if query_keys is not None:
        q_keys, g_keys = _to_numpy(query_keys).reshape(-1), _to_numpy(gallery_keys).reshape(-1)
        if len(q_keys) != len(q_emb) or len(g_keys) != len(g_emb):
            raise ValueError("keys must have one entry per embedding")
        usable = q_keys[:, None] != g_keys[None, :]
    return similarity_metrics(cosine_similarity(q_emb, g_emb), query_ids, gallery_ids, usable)


def _tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """True-positive rate of same-patient pairs at a false-positive rate of at most ``fpr``.

    The threshold is the smallest score that lets through no more than ``fpr`` of the
    different-patient pairs (ties above it all count), so the figure never overstates what an
    attacker bound by that false-alarm rate links.
    """
    neg = np.sort(scores[~labels])[::-1]
    pos = scores[labels]
    k = int(math.floor(fpr * len(neg)))  # negatives allowed above the threshold
    if k >= len(neg):
        return 1.0
    threshold = neg[k]  # pairs must score strictly above the (k+1)-th best negative
    return float(np.mean(pos > threshold))


def similarity_metrics(sims: Any, query_ids: Any, gallery_ids: Any,
                       usable: Any | None = None) -> dict[str, float | int]:
    """Re-identification figures of any attacker from its query × gallery similarity matrix.

    Every attacker of the suite (learned embeddings, keypoint inlier counts, patch correlations,
    foundation-model retrieval) reduces to a matrix ``sims[Q, G]`` where higher means "more likely
    the same patient"; one function then scores them all the same way. A gallery item is a hit
    when it has the query's patient id. Returned (plain Python numbers):

    * ``p_at_1`` — fraction of queries whose most similar gallery item is a hit (top-1 accuracy);
    * ``map_at_r`` — mean AP@R (Musgrave et al., "A Metric Learning Reality Check", 2020), R the
      number of the query's patient's gallery items;
    * ``verification_auc`` — ROC AUC of the similarity over every usable query–gallery pair,
      same patient (positive) versus different (``nan`` when one class is absent);
    * ``tpr_at_fpr_1e-2`` / ``tpr_at_fpr_1e-3`` — same-patient pairs linked by a threshold that
      lets through at most 1 % / 0.1 % of different-patient pairs (``nan`` when a class is absent);
    * ``chance_p_at_1`` — expected P@1 of a random ranking: mean of R / (usable gallery items);
    * ``n_queries`` (scored), ``n_dropped_queries`` (no usable gallery item of their patient),
      ``n_gallery_patients``.

    ``usable`` (bool [Q, G]) excludes pairs from every metric. Ties in similarity are resolved in
    expectation over random orders (see module docstring), so a constant matrix scores exactly
    chance.
    """
    sims = np.asarray(_to_numpy(sims), dtype=np.float64)
    q_ids, g_ids = _to_numpy(query_ids).reshape(-1), _to_numpy(gallery_ids).reshape(-1)
    if sims.shape != (len(q_ids), len(g_ids)):
        raise ValueError(f"similarity matrix of shape {sims.shape} does not match "
                         f"{len(q_ids)} queries x {len(g_ids)} gallery items")
    if len(g_ids) == 0:
        raise ValueError("empty gallery")
    if not np.isfinite(sims).all():
        raise ValueError("similarity matrix holds non-finite values")
    sims = np.round(sims, _TIE_DECIMALS)
    same = q_ids[:, None] == g_ids[None, :]
    usable = np.ones_like(same) if usable is None else np.asarray(usable, dtype=bool)

    p1, ap, chance, kept = [], [], [], []
    for i in range(len(q_ids)):
        rel = same[i, usable[i]]
        if not rel.any():
            continue
        a, b = _query_scores(sims[i, usable[i]], rel)
        p1.append(a)
        ap.append(b)
        chance.append(rel.sum() / len(rel))
        kept.append(i)

    pair_mask = usable[kept]
    pair_labels = same[kept][pair_mask]
    pair_scores = sims[kept][pair_mask]
    both = len(np.unique(pair_labels)) == 2
    return {
        "p_at_1": float(np.mean(p1)) if p1 else math.nan,
        "map_at_r": float(np.mean(ap)) if ap else math.nan,
        "verification_auc": float(roc_auc_score(pair_labels, pair_scores)) if both else math.nan,
        "tpr_at_fpr_1e-2": _tpr_at_fpr(pair_labels, pair_scores, 1e-2) if both else math.nan,
        "tpr_at_fpr_1e-3": _tpr_at_fpr(pair_labels, pair_scores, 1e-3) if both else math.nan,
        "chance_p_at_1": float(np.mean(chance)) if chance else math.nan,
        "n_queries": len(kept),
        "n_dropped_queries": len(q_ids) - len(kept),
        "n_gallery_patients": int(len(np.unique(g_ids))),
    }


def per_finding_auc(labels: Any, scores: Any, names: tuple[str, ...] | None = None) -> dict[str, float]:
    """ROC AUC of each finding (column) that has both classes; findings with one class are left out.

    Keys are ``names`` when given, otherwise column indices as strings (JSON-ready either way).
    """
    y, s = _to_numpy(labels), _to_numpy(scores)
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must both be [N, F]")
    if names is not None and len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} names for {y.shape[1]} findings")
    out: dict[str, float] = {}
    for f in range(y.shape[1]):
        if len(np.unique(y[:, f])) == 2:
            out[names[f] if names is not None else str(f)] = float(roc_auc_score(y[:, f], s[:, f]))
    return out


def macro_auc(labels: Any, scores: Any) -> float:
    """Mean ROC AUC over findings with both classes present (``nan`` if none).

    sklearn's ``average="macro"`` refuses a column with a single class, which small held-out
    sets of rare findings produce; those findings carry no ranking information and are skipped.
    """
    aucs = per_finding_auc(labels, scores)
    return float(np.mean(list(aucs.values()))) if aucs else math.nan


def _as_batch(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(_to_numpy(a), dtype=torch.float64)
    y = torch.as_tensor(_to_numpy(b), dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim == 2:
        x, y = x[None], y[None]
    if x.ndim != 3:
        raise ValueError(f"expected [N, H, W] or [H, W], got {tuple(x.shape)}")
    return x, y


def psnr_per_image(a: Any, b: Any, data_range: float = 1.0) -> np.ndarray:
    """PSNR in dB of each image pair, ``10 log10(L^2 / MSE)``; ``inf`` for identical images."""
    x, y = _as_batch(a, b)
    mse = ((x - y) ** 2).flatten(1).mean(1).numpy()
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def psnr(a: Any, b: Any, data_range: float = 1.0) -> float:
    """Mean per-image PSNR in dB (``inf`` as soon as one pair is identical, as in scikit-image)."""
    return float(np.mean(psnr_per_image(a, b, data_range)))


def _gaussian_band(n: int, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """[n, n - size + 1] matrix whose product with a signal is its 'valid' Gaussian filtering."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    band = torch.zeros(n, n - size + 1, dtype=torch.float64)
    for k in range(n - size + 1):
        band[k:k + size, k] = g
    return band


def ssim_per_image(a: Any, b: Any, data_range: float = 1.0, chunk: int = 64) -> np.ndarray:
    """SSIM of each image pair (Wang et al., IEEE TIP 2004), the mean of its SSIM map.

    Local means, variances and covariance are weighted by an 11×11 Gaussian window (σ = 1.5),
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, and the map covers the 'valid' region only (no
    padding), the standard definition. The window is the outer product of two 1-D Gaussians, so
    it is applied as two banded matrix products (the same sums as the 2-D convolution; float64
    matmul runs on BLAS, several times faster than float64 ``conv2d`` on CPU), to ``chunk``
    images at a time to bound memory.
    """
    x_all, y_all = _as_batch(a, b)
    h, w = x_all.shape[-2:]
    if min(h, w) < 11:
        raise ValueError(f"SSIM needs images of at least 11×11, got {(h, w)}")
    band_h, band_w = _gaussian_band(h), _gaussian_band(w)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for start in range(0, len(x_all), chunk):
        x, y = x_all[start:start + chunk], y_all[start:start + chunk]
        stack = torch.stack([x, y, x * x, y * y, x * y])
        mu_x, mu_y, e_xx, e_yy, e_xy = band_h.T @ (stack @ band_w)
        var_x, var_y, cov = e_xx - mu_x**2, e_yy - mu_y**2, e_xy - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        out.append(ssim_map.flatten(1).mean(1))
    return torch.cat(out).numpy()


def ssim(a: Any, b: Any, data_range: float = 1.0) -> float:
    """Mean per-image SSIM over a batch [N, H, W] (or one [H, W] image)."""
    return float(np.mean(ssim_per_image(a, b, data_range)))
