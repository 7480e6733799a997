"""Each attacker of the suite on small cases with known answers.

An identical copy is matched, a shifted copy is matched by the geometric attackers (patch,
keypoint), an unrelated image scores below any true copy, and a constant image gives exactly
chance: the ranking metrics resolve ties in expectation, and every attacker maps a textureless
image to the same score against every gallery item.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedeid.config import preset
from fedeid.data.imageset import ImageSet
from fedeid.data.synthetic import generate
from fedeid.eval.attackers import (ATTACKERS, AttackSuite, EmbeddingMatcher, FoundationFeatures, KeypointMatcher,
                                   PatchMatcher, fit_projection, fused, split_gallery, standardised, to_uint8,
                                   worst_case)
from fedeid.eval.metrics import cosine_similarity, similarity_metrics


@pytest.fixture(scope="module")
def data():
    cfg = preset("test")
    sites, test = generate(cfg.data)
    return cfg, ImageSet.concat(sites), test


def _shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The same images moved by (dy, dx) pixels, the uncovered border filled by its edge."""
    h, w = images.shape[1:]
    pad = np.pad(images, ((0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx))), mode="edge")
    return pad[:, abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w]


def _matchers(cfg, train):
    features = FoundationFeatures(cfg, torch.device("cpu"))
    features.fit(train.images)
    return {"keypoint": KeypointMatcher(), "patch": PatchMatcher(cfg.model.patch_size, 2, 4),
            "foundation": EmbeddingMatcher(features)}


def test_split_gallery_and_uint8():
    test = generate(preset("test").data)[1]
    gallery, queries = split_gallery(test)
    assert set(test.patient_ids[gallery]) == set(test.patient_ids[queries])
    assert not set(gallery) & set(queries)
    assert to_uint8(np.array([[[-0.2, 0.0, 0.5, 1.0, 1.7]]])).tolist() == [[[0, 0, 128, 255, 255]]]
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(np.array([[[np.nan]]]))


def test_copies_are_matched_and_unrelated_images_are_not(data):
    cfg, train, test = data
    gallery = test.images[:6]
    ids = np.arange(6)
    noise = np.random.default_rng(0).random((6, *gallery.shape[1:])).astype(np.float32)
    for name, m in _matchers(cfg, train).items():
        prepared = m.prepare(gallery)
        same = m.match(gallery, prepared)
        assert similarity_metrics(same, ids, ids)["p_at_1"] == 1.0, name
        unrelated = m.match(noise, prepared)
        # every true copy scores above every pairing of an unrelated image with the gallery
        assert np.diag(same).min() > unrelated.max(), name
    shifted = _shifted(gallery, 2, -1)
    for name in ("keypoint", "patch"):
        m = _matchers(cfg, train)[name]
        sims = m.match(shifted, m.prepare(gallery))
        assert similarity_metrics(sims, ids, ids)["p_at_1"] == 1.0, name


def test_patch_matcher_needs_its_shift_search(data):
    """Without shift search a moved copy loses its correlation; with it the copy scores ~1."""
    cfg, _, test = data
    gallery = test.images[:4]
    moved = _shifted(gallery, 2, 2)
    exact = PatchMatcher(cfg.model.patch_size, 2, 4)
    rigid = PatchMatcher(cfg.model.patch_size, 0, 4)
    assert np.diag(exact.match(moved, exact.prepare(gallery))).min() > 0.95
    assert np.diag(rigid.match(moved, rigid.prepare(gallery))).max() < np.diag(
        exact.match(moved, exact.prepare(gallery))).min()
    with pytest.raises(ValueError, match="top_k"):
        PatchMatcher(8, 2, 0)


def test_constant_images_score_exactly_chance(data):
    cfg, train, test = data
    gallery, queries = split_gallery(test)
    flat = np.full_like(test.images[queries], 0.5)
    for name, m in _matchers(cfg, train).items():
        sims = m.match(flat, m.prepare(test.images[gallery]))
        figures = similarity_metrics(sims, test.patient_ids[queries], test.patient_ids[gallery])
        assert figures["p_at_1"] == pytest.approx(figures["chance_p_at_1"]), name


def test_projection_learns_identity_from_features():
    """Identity in 5 quiet dimensions under 25 loud nuisance ones: cosine on the raw features
    is lost in the nuisance, the fitted projection finds the identity."""
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(10), 4)
    feats = np.concatenate([rng.normal(0, 1, (10, 5))[ids] + rng.normal(0, 0.1, (40, 5)),
                            rng.normal(0, 5, (40, 25))], axis=1)

    def p_at_1(x: np.ndarray) -> float:
        sims = cosine_similarity(x, x)
        np.fill_diagonal(sims, -np.inf)
        return float((ids[sims.argmax(1)] == ids).mean())

    assert p_at_1(feats) < 0.5
    assert p_at_1(fit_projection(feats, ids)(feats)) > 0.9


def test_fusion_adds_up_attackers_that_fail_on_different_queries():
    """Two attackers each find half of the patients and score the rest at random; their fusion
    finds all of them, whatever each one's scale (inlier counts beside cosines)."""
    rng = np.random.default_rng(0)
    n = 20
    ids = np.arange(n)
    a = rng.uniform(0, 1, (n, n))
    b = rng.uniform(0, 1, (n, n)) * 50  # another scale
    a[ids[:10], ids[:10]] = 3.0  # a is confident on the first half
    b[ids[10:], ids[10:]] = 150.0  # b on the second
    assert similarity_metrics(a, ids, ids)["p_at_1"] < 0.8 and similarity_metrics(b, ids, ids)["p_at_1"] < 0.8
    both = fused({"a": a, "b": b})
    assert set(both) == {"a+b"}
    assert similarity_metrics(both["a+b"], ids, ids)["p_at_1"] == 1.0
    assert set(fused({"a": a, "b": b, "c": a})) == {"a+b", "a+c", "b+c", "all"}
    assert fused({"a": a}) == {}
    z = standardised(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [np.nan, 0.0, 1.0]]))
    np.testing.assert_allclose(z[0], [-1.2247449, 0, 1.2247449], rtol=1e-6)
    assert np.all(z[1] == 0) and np.isfinite(z).all()  # a constant row carries nothing; NaN is no score


def test_worst_case_takes_each_figure_from_the_strongest_attacker():
    a = {"p_at_1": 0.2, "map_at_r": 0.5, "verification_auc": 0.9, "tpr_at_fpr_1e-2": 0.1,
         "tpr_at_fpr_1e-3": float("nan"), "chance_p_at_1": 0.1, "n_queries": 10}
    b = {**a, "p_at_1": 0.6, "map_at_r": 0.3, "verification_auc": 0.7, "tpr_at_fpr_1e-3": 0.05}
    w = worst_case({"learned": a, "patch": b})
    assert w["p_at_1"] == 0.6 and w["map_at_r"] == 0.5 and w["verification_auc"] == 0.9
    assert w["tpr_at_fpr_1e-3"] == 0.05 and w["attacker"] == "patch" and w["chance_p_at_1"] == 0.1
    with pytest.raises(ValueError):
        worst_case({})


def test_suite_on_the_test_preset(data):
    """Originals are re-identified by the suite; a method that outputs a constant image leaves
    every attacker, the adaptive and the model holder included, at chance."""
    cfg, train, test = data
    suite = AttackSuite(train, test, cfg, progress=False)
    assert suite.names == ATTACKERS
    assert suite.similarities(lambda im, lv: im, 0.0)["patch"].shape == (len(suite.queries), len(suite.gallery))
    originals = suite.score(lambda im, lv: im, 0.0, attackers=("keypoint", "patch", "model_holder"))
    assert set(originals) == {"keypoint", "patch", "model_holder", "worst_case"}
    assert originals["worst_case"]["p_at_1"] == 1.0
    calls = []

    def flat(images: np.ndarray, level: float) -> np.ndarray:
        calls.append(len(images))
        return np.full_like(images, 0.5)

    scored = suite.score(flat, 1.0)
    assert set(scored) == set(ATTACKERS) | {"worst_case"}
    for name in ATTACKERS:
        assert scored[name]["p_at_1"] == pytest.approx(scored[name]["chance_p_at_1"]), name
    # test images, training images (retrained attackers), the gallery again (model holder)
    assert calls == [len(test), len(train), len(suite.gallery)]
    with pytest.raises(ValueError, match="unknown attackers"):
        AttackSuite(train, test, cfg, attackers=("sift",))
    # the fusion is never below the best attacker it fuses, and names what it used
    both = suite.score(lambda im, lv: im, 0.0, attackers=("keypoint", "patch", "fusion"))
    assert both["fusion"]["p_at_1"] >= max(both["keypoint"]["p_at_1"], both["patch"]["p_at_1"])
    assert both["fusion"]["matcher"] in {"keypoint", "patch", "keypoint+patch"}
    with pytest.raises(ValueError, match="fusion attacker needs"):
        suite.score(lambda im, lv: im, 0.0, attackers=("fusion",))
