"""The synthetic benchmark: deterministic, identity in the anatomy, findings independent and visible."""

import dataclasses

import numpy as np
import pytest
import torch

from fedeid.config import FINDINGS, preset
from fedeid.data import synthetic as sy

torch.set_num_threads(1)


def small_cfg(**changes):
    cfg = preset("test").data
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def population():
    """Two sites of 60 patients x 4 images at 64 px: enough to measure rates and differences."""
    cfg = small_cfg(n_sites=2, patients_per_site=60, images_per_patient=4)
    return [sy.generate_site(cfg, s) for s in range(2)]


def test_same_config_same_arrays():
    cfg = small_cfg()
    (a_sites, a_test), (b_sites, b_test) = sy.generate(cfg), sy.generate(cfg)
    for a, b in zip(a_sites + [a_test], b_sites + [b_test]):
        assert np.array_equal(a.images, b.images)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.patient_ids, b.patient_ids)
    assert not np.array_equal(sy.generate_site(small_cfg(seed=1), 0).images, a_sites[0].images)


def test_a_patients_images_do_not_depend_on_the_other_patients():
    big = small_cfg(patients_per_site=8, n_sites=3, test_patients=6)
    few = small_cfg(patients_per_site=3, n_sites=2, test_patients=2)
    m = big.images_per_patient
    for site in (0, 1):
        a, b = sy.generate_site(big, site), sy.generate_site(few, site)
        assert np.array_equal(b.images, a.images[:3 * m]) and np.array_equal(b.labels, a.labels[:3 * m])
    # Test patient k is scanned at site k % n_sites: patients 0 and 1 keep their site here.
    ta, tb = sy.generate_test(big), sy.generate_test(few)
    assert np.array_equal(ta.images[:2 * m], tb.images[:2 * m])


@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes_dtype_range_and_ids(size):
    cfg = small_cfg(image_size=size, n_sites=2, patients_per_site=2, images_per_patient=2, test_patients=2)
    sites, test = sy.generate(cfg)
    for s, data in enumerate(sites):
        assert data.images.shape == (4, size, size) and data.images.dtype == np.float32
        assert data.images.min() >= 0.0 and data.images.max() <= 1.0
        assert data.labels.shape == (4, len(FINDINGS)) and set(np.unique(data.labels)) <= {0.0, 1.0}
        assert data.finding_names == FINDINGS and (data.sites == s).all()
        assert list(data.patient_ids) == [s * 100000, s * 100000, s * 100000 + 1, s * 100000 + 1]
        assert data.images.std() > 0.1  # a picture, not a constant
    assert list(test.patient_ids) == [10000000, 10000000, 10000001, 10000001]
    assert list(test.sites) == [0, 0, 1, 1]
    train_ids = set(np.concatenate([d.patient_ids for d in sites]))
    assert not train_ids & set(test.patient_ids)


@pytest.mark.parametrize("size", [32, 63, 257, 512, 100.5])
def test_unsupported_sizes_are_refused(size):
    with pytest.raises(ValueError, match="image_size"):
        sy.generate_site(small_cfg(image_size=size), 0)


def test_identity_is_stable_within_a_patient(population):
    data = population[0]
    n = len(data)
    small = data.images.reshape(n, 16, 4, 16, 4).mean((2, 4)).reshape(n, -1)
    dist = ((small[:, None] - small[None]) ** 2).mean(-1)
    same = data.patient_ids[:, None] == data.patient_ids[None]
    within, between = dist[same & ~np.eye(n, dtype=bool)].mean(), dist[~same].mean()
    assert within < 0.6 * between
    # Even raw 16x16 pixels find another image of the same patient far above chance (1/60).
    np.fill_diagonal(dist, np.inf)
    assert (data.patient_ids[dist.argmin(1)] == data.patient_ids).mean() > 0.3


def test_anatomy_is_the_patients_and_differs_between_patients():
    profile = sy.site_profile(0, 0)
    one = sy._anatomy(sy._rng(0, sy._STREAM_ANATOMY, 0, 5), profile).vector()
    again = sy._anatomy(sy._rng(0, sy._STREAM_ANATOMY, 0, 5), profile).vector()
    others = np.stack([sy._anatomy(sy._rng(0, sy._STREAM_ANATOMY, 0, k), profile).vector() for k in range(20)])
    assert np.array_equal(one, again)
    spread = others.std(0)
    assert (spread[spread > 0] > 1e-3).all() and (spread > 0).sum() > 0.9 * len(spread)


def test_findings_are_independent_of_identity(population):
    """Permutation test: per-patient finding rates are no more spread than if images were shuffled."""
    rng = np.random.default_rng(0)
    for data in population:
        pid = np.unique(data.patient_ids, return_inverse=True)[1]
        count = np.bincount(pid)
        for j, name in enumerate(FINDINGS):
            y = data.labels[:, j]
            spread = lambda v: np.var(np.bincount(pid, weights=v) / count)  # noqa: E731
            null = np.array([spread(rng.permutation(y)) for _ in range(400)])
            p = (1 + (null >= spread(y)).sum()) / (1 + len(null))
            assert p > 0.01, f"{name} clusters by patient (p={p:.3f})"


def _region(size, xlo, xhi, ylo, yhi, both_sides=False):
    c = (np.arange(size) * 2 + 1) / size - 1
    X, Y = np.meshgrid(c, c)
    x = np.abs(X) if both_sides else X
    return (x > xlo) & (x < xhi) & (Y > ylo) & (Y < yhi)


def test_findings_show_where_expected_on_average(population):
    data = population[0]
    lungs = _region(64, 0.2, 0.7, -0.55, 0.3, both_sides=True)
    expected = {
        "effusion": _region(64, 0.35, 0.75, 0.1, 0.5, both_sides=True),  # lung bases
        "cardiomegaly": _region(64, 0.2, 0.55, 0.0, 0.5),  # left heart border (image right)
        "opacity": lungs,
    }
    outside = _region(64, 0.9, 1.0, -1.0, 1.0, both_sides=True)
    for name, region in expected.items():
        j = FINDINGS.index(name)
        diff = data.images[data.labels[:, j] == 1].mean(0) - data.images[data.labels[:, j] == 0].mean(0)
        assert diff[region].mean() > 0.02, name  # denser (brighter) where the finding lies
        assert abs(diff[outside].mean()) < 0.01, name


@pytest.mark.parametrize("finding", FINDINGS)
def test_each_finding_replaces_lung_air_in_its_own_place(finding):
    """The same patient and acquisition with and without one finding: the change is local and dense."""
    size = 96
    anatomy = sy._anatomy(sy._rng(3, sy._STREAM_ANATOMY, 0, 1), sy.site_profile(3, 0))
    layers = sy._patient_layers(anatomy, size)
    none = np.zeros(len(FINDINGS))
    one = none.copy()
    one[FINDINGS.index(finding)] = 1
    for k in range(5):
        base = sy._image_density(anatomy, layers, sy._rng(9, k), none, size)
        diff = sy._image_density(anatomy, layers, sy._rng(9, k), one, size) - base
        changed = np.abs(diff) > 0.05
        assert diff.min() > -1e-6 and changed.any()  # only ever adds density
        assert (layers.lung[changed] > 0.1).mean() > 0.95  # inside the lung fields (their soft edges too)
        area = changed.mean()
        if finding == "nodule":
            assert area < 0.02
        else:
            assert area > 0.01
        ys = np.nonzero(changed)[0].mean() / size * 2 - 1
        if finding == "effusion":
            assert ys > 0.1  # at the bases
        if finding == "cardiomegaly":
            assert ys > -0.1  # around the heart, in the lower chest


def test_sites_are_not_iid(population):
    profiles = [sy.site_profile(0, s) for s in range(3)]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        pa, pb = profiles[a], profiles[b]
        assert not np.allclose(pa.prevalence, pb.prevalence)
        assert (pa.gamma, pa.noise, pa.blur, pa.window) != (pb.gamma, pb.noise, pb.blur, pb.window)
    for profile in profiles:
        assert ((profile.prevalence >= 0.15) & (profile.prevalence <= 0.40)).all()
    a, b = population
    assert abs(a.images.mean() - b.images.mean()) > 0.01 or abs(a.images.std() - b.images.std()) > 0.01
