"""Metrics on hand-made inputs with known answers, and the privacy–utility plot and check."""

from __future__ import annotations

import itertools
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedeid.eval.metrics import (cosine_similarity, macro_auc, per_finding_auc, psnr, psnr_per_image, reid_metrics, similarity_metrics, ssim,
                                 ssim_per_image)
from fedeid.eval.plots import pareto_dominance, plot_privacy_utility


def _angle(deg: float) -> np.ndarray:
    return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


def _ap_at_r(relevant_in_rank_order: np.ndarray) -> float:
    """Musgrave et al.'s AP@R written out plainly, for one ranking without ties."""
    r = int(relevant_in_rank_order.sum())
    hits = np.cumsum(relevant_in_rank_order[:r])
    return float(sum(hits[i] / (i + 1) for i in range(r) if relevant_in_rank_order[i]) / r)


def test_perfect_retrieval() -> None:
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(5), 3)
    centres = np.eye(8)[:5] * 10
    query = centres[ids] + rng.normal(0, 0.1, (15, 8))
    gallery = centres[ids] + rng.normal(0, 0.1, (15, 8))
    m = reid_metrics(query, ids, gallery, ids)
    assert m["p_at_1"] == 1.0 and m["map_at_r"] == pytest.approx(1.0) and m["verification_auc"] == 1.0
    assert m["chance_p_at_1"] == pytest.approx(3 / 15)
    assert (m["n_queries"], m["n_dropped_queries"], m["n_gallery_patients"]) == (15, 0, 5)


def test_random_embeddings_score_near_chance() -> None:
    rng = np.random.default_rng(1)
    g_ids = np.repeat(np.arange(20), 5)
    q_ids = np.repeat(np.arange(20), 10)
    m = reid_metrics(rng.normal(size=(200, 32)), q_ids, rng.normal(size=(100, 32)), g_ids)
    assert m["chance_p_at_1"] == pytest.approx(0.05)
    assert abs(m["p_at_1"] - 0.05) < 0.05
    assert abs(m["verification_auc"] - 0.5) < 0.05


def test_hand_computed_map_at_r() -> None:
    # Query at 0°; gallery ranked by angle: A(10°) B(20°) A(30°) B(40°) -> AP@R = (1/2)(1/1) = 0.5.
    gallery = np.stack([_angle(a) for a in (10, 20, 30, 40)])
    m = reid_metrics(_angle(0)[None], np.array([0]), gallery, np.array([0, 1, 0, 1]))
    assert m["p_at_1"] == 1.0 and m["map_at_r"] == pytest.approx(0.5)
    # B A A B -> AP@R = (1/2)(0 + 1/2) = 0.25, P@1 = 0.
    m = reid_metrics(_angle(0)[None], np.array([0]), gallery, np.array([1, 0, 0, 1]))
    assert m["p_at_1"] == 0.0 and m["map_at_r"] == pytest.approx(0.25)
    # Verification AUC: pairs (sim, same) -> sklearn on the same pairs.
    sims = gallery @ _angle(0)
    assert m["verification_auc"] == pytest.approx(roc_auc_score([0, 1, 1, 0], sims))


def test_ties_are_scored_in_expectation() -> None:
    """Expected P@1 / AP@R over every order of tied items equals the closed form."""
    angles = [10, 30, 30, 30, 60, 60]
    ids = np.array([1, 0, 1, 0, 0, 1])
    gallery = np.stack([_angle(a) for a in angles])
    sims = np.round(gallery @ _angle(0), 10)
    rel = ids == 0
    p1, ap = [], []
    for perm in itertools.permutations(range(len(ids))):
        perm = np.array(perm)
        order = perm[np.argsort(-sims[perm], kind="stable")]
        p1.append(rel[order[0]])
        ap.append(_ap_at_r(rel[order]))
    m = reid_metrics(_angle(0)[None], np.array([0]), gallery, ids)
    assert m["p_at_1"] == pytest.approx(np.mean(p1))
    assert m["map_at_r"] == pytest.approx(np.mean(ap))


def test_identical_embeddings_score_exactly_chance() -> None:
    ids = np.repeat(np.arange(4), [1, 2, 3, 4])
    emb = np.ones((10, 6))
    m = reid_metrics(emb, ids, emb, ids)
    assert m["p_at_1"] == pytest.approx(m["chance_p_at_1"])
    assert m["verification_auc"] == pytest.approx(0.5)


def test_keys_exclude_pairs_and_drop_unmatched_queries() -> None:
    ids = np.array([0, 0, 1, 2, 2])
    emb = np.stack([_angle(a) for a in (0, 40, 90, 180, 200)])
    keys = np.arange(5)
    m = reid_metrics(emb, ids, emb, ids, query_keys=keys, gallery_keys=keys)
    # Patient 1 has a single image: excluded against itself, nothing left to find.
    assert m["n_queries"] == 4 and m["n_dropped_queries"] == 1
    assert m["p_at_1"] == 1.0 and m["chance_p_at_1"] == pytest.approx(0.25)
    # Without exclusion every query finds itself.
    assert reid_metrics(emb, ids, emb, ids)["n_dropped_queries"] == 0
    with pytest.raises(ValueError):
        reid_metrics(emb, ids, emb, ids, query_keys=keys)


def test_macro_auc_matches_sklearn_and_skips_single_class_findings() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=(50, 3)).astype(np.float32)
    scores = labels + rng.normal(0, 0.8, size=(50, 3))
    assert macro_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores, average="macro"))
    labels[:, 1] = 0
    per = per_finding_auc(labels, scores, ("a", "b", "c"))
    assert set(per) == {"a", "c"}
    assert macro_auc(labels, scores) == pytest.approx((per["a"] + per["c"]) / 2)
    assert math.isnan(macro_auc(np.zeros((4, 2)), np.zeros((4, 2))))


def _ssim_direct(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al.'s SSIM, window by window in plain numpy (slow; for the reference check)."""
    c = np.arange(11) - 5
    g = np.exp(-(c**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * a).sum(), (w * b).sum()
            vx, vy = (w * (a - mx) ** 2).sum(), (w * (b - my) ** 2).sum()
            cxy = (w * (a - mx) * (b - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_formula_and_basic_properties() -> None:
    rng = np.random.default_rng(3)
    x = rng.random((3, 16, 18))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    per = ssim_per_image(x, y, chunk=2)  # two chunks: the chunking must not change anything
    for k in range(3):
        assert per[k] == pytest.approx(_ssim_direct(x[k], y[k]), abs=1e-10)
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(np.full((1, 12, 12), 0.3), np.full((1, 12, 12), 0.3)) == pytest.approx(1.0)
    assert ssim(x[0], y[0]) == pytest.approx(per[0])
    assert ssim(x, y) == pytest.approx(ssim(y, x))
    noisier = np.clip(x + rng.normal(0, 0.3, x.shape), 0, 1)
    assert ssim(x, noisier) < ssim(x, y) < 1.0
    with pytest.raises(ValueError):
        ssim(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)))


def test_psnr_known_values() -> None:
    x = np.full((3, 8, 8), 0.5)
    assert psnr(x, x + 0.1) == pytest.approx(20.0)
    assert psnr(x, x + 0.1, data_range=255.0) == pytest.approx(20 * math.log10(2550))
    per = psnr_per_image(x, np.stack([x[0], x[1] + 0.01, x[2] + 0.1]))
    assert math.isinf(per[0]) and per[1:] == pytest.approx([40.0, 20.0])


def _results() -> dict:
    levels = [0.0, 0.5, 1.0]
    method = {"levels": levels, "worst_p_at_1": [1.0, 0.4, 0.05], "worst_verification_auc": [1.0, 0.8, None],
              "utility_auc": [0.85, 0.8, 0.7], "utility_auc_retrained": [0.85, 0.82, 0.75],
              "ssim": [1.0, 0.8, 0.5], "psnr": [None, 25.0, 18.0],
              "attacks": {"learned": {"p_at_1": [0.9, 0.3, 0.05]}, "patch": {"p_at_1": [1.0, 0.4, 0.04]}}}
    blur = {"levels": levels, "worst_p_at_1": [1.0, 0.6, 0.2], "utility_auc": [0.85, 0.7, 0.55],
            "ssim": [1.0, 0.6, 0.4], "psnr": [None, 22.0, 16.0]}
    return {"methods": {"fedeid": method, "blur": blur},
            "reference": {"worst_p_at_1_original": 1.0, "utility_auc_original": 0.85, "chance_p_at_1": 0.04}}


def test_plot_writes_a_png(tmp_path) -> None:
    path = tmp_path / "sub" / "pu.png"
    plot_privacy_utility(_results(), path, dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = plt.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    bad = _results()
    bad["methods"]["blur"]["ssim"] = [1.0]
    with pytest.raises(ValueError, match="blur"):
        plot_privacy_utility(bad, tmp_path / "bad.png")
    del bad["methods"]["blur"]["worst_p_at_1"]
    with pytest.raises(ValueError, match="lacks"):
        plot_privacy_utility(bad, tmp_path / "bad.png")


def test_pareto_dominance_on_constructed_curves() -> None:
    a = [(0.1, 0.6), (0.5, 0.8)]
    r = pareto_dominance(a, [(0.3, 0.7), (0.5, 0.75)])
    assert r["dominates"] and r["points"][0]["a_utility"] == pytest.approx(0.7)
    assert r["min_margin"] == pytest.approx(0.0)
    r = pareto_dominance(a, [(0.3, 0.71)])
    assert not r["dominates"] and r["n_failed"] == 1 and r["points"][0]["margin"] == pytest.approx(-0.01)
    assert pareto_dominance(a, [(0.3, 0.71)], utility_tol=0.02)["dominates"]
    # Monotone hull: a more private and more useful point serves less private targets too.
    r = pareto_dominance([(0.1, 0.9), (0.5, 0.6)], [(0.4, 0.85), (0.9, 0.88)])
    assert r["dominates"] and [p["a_utility"] for p in r["points"]] == pytest.approx([0.9, 0.9])
    # A baseline more private than anything a reached is uncovered and fails ...
    r = pareto_dominance(a, [(0.05, 0.5)])
    assert not r["dominates"] and r["n_uncovered"] == 1 and r["points"][0]["margin"] is None
    # ... unless a P@1 tolerance covers it, or it is no better than discarding the image.
    assert pareto_dominance(a, [(0.05, 0.5)], p_tol=0.05)["dominates"]
    assert pareto_dominance(a, [(0.05, 0.5)], trivial_points=[(0.04, 0.5)])["dominates"]
    assert not pareto_dominance(a, [(0.05, 0.58)], trivial_points=[(0.04, 0.5)])["dominates"]
    # An image baseline's level 0 is the original itself, which any method can release.
    assert not pareto_dominance(a, [(0.9, 0.85)])["dominates"]
    assert pareto_dominance(a, [(0.9, 0.85)], trivial_points=[(0.04, 0.5), (0.9, 0.85)])["dominates"]
    r = pareto_dominance(a + [(math.nan, 0.9)], [(0.3, 0.7)])
    assert r["n_skipped"] == 1 and r["dominates"]


def test_similarity_metrics_scores_any_attackers_matrix():
    ids = np.repeat(np.arange(10), 2)
    perfect = (ids[:, None] == ids[None, :]).astype(float) * 5.0  # e.g. keypoint inlier counts
    m = similarity_metrics(perfect, ids, ids)
    assert m["p_at_1"] == 1.0 and m["verification_auc"] == 1.0
    assert m["tpr_at_fpr_1e-2"] == 1.0 and m["tpr_at_fpr_1e-3"] == 1.0
    flat = similarity_metrics(np.zeros((20, 20)), ids, ids)
    assert flat["p_at_1"] == pytest.approx(flat["chance_p_at_1"])
    assert flat["verification_auc"] == 0.5
    assert flat["tpr_at_fpr_1e-2"] == 0.0  # a constant score cannot separate anything at 1 % FPR


def test_tpr_at_fpr_never_counts_a_threshold_that_lets_through_too_many_negatives():
    # 4 queries of patient 0, one gallery image of theirs (score 0.5) and 100 of other patients:
    # 400 different-patient pairs, 4 of them (1 %) scoring 0.9 above every positive. At FPR 1 %
    # those 4 may pass and every positive is linked; at 0.1 % none may, so no positive is.
    q_ids = np.zeros(4, dtype=int)
    g_ids = np.arange(101)
    sims = np.tile(np.r_[0.5, np.linspace(0.0, 0.4, 100)], (4, 1))
    sims[:, 1] = 0.9
    m = similarity_metrics(sims, q_ids, g_ids)
    assert m["tpr_at_fpr_1e-2"] == 1.0
    assert m["tpr_at_fpr_1e-3"] == 0.0


def test_similarity_metrics_rejects_bad_matrices():
    ids = np.arange(3)
    with pytest.raises(ValueError, match="shape"):
        similarity_metrics(np.zeros((3, 2)), ids, ids)
    with pytest.raises(ValueError, match="non-finite"):
        similarity_metrics(np.full((3, 3), np.nan), ids, ids)


def test_cosine_similarity_known_values() -> None:
    sims = cosine_similarity(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]]))
    assert sims == pytest.approx(np.array([[1.0, 1 / math.sqrt(2), 0.0], [0.0, 0.0, 0.0]]))
