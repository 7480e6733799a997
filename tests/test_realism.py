"""The realism detectors: known answers on releases that are the originals and on flat ones."""

import numpy as np
import pytest

from fedeid.config import preset
from fedeid.data.synthetic import generate
from fedeid.data.imageset import ImageSet
from fedeid.eval.realism import detectability, frechet_distance


@pytest.fixture(scope="module")
def data():
    cfg = preset("test")
    sites, test = generate(cfg.data)
    return cfg, ImageSet.concat(sites).images, test.images


def test_a_release_identical_to_its_original_cannot_be_told_apart(data):
    cfg, train, test = data
    r = detectability(train, train.copy(), test, test.copy(), cfg)
    assert r["by_detector"] == {"learned": 0.5, "foundation": 0.5}  # every pair ties
    assert r["detect_auc"] == 0.5
    assert r["feature_fd"] == pytest.approx(0.0, abs=1e-3)
    assert r["feature_fd_reference"] > 1e-3


def test_flat_releases_give_themselves_away(data):
    cfg, train, test = data
    flat = lambda x: np.full_like(x, float(x.mean()))  # noqa: E731
    r = detectability(train, flat(train), test, flat(test), cfg)
    assert r["by_detector"]["foundation"] >= 0.95
    assert r["detect_auc"] == max(r["by_detector"].values()) >= 0.95
    assert r["detector"] in r["by_detector"]
    assert r["feature_fd"] > 10 * r["feature_fd_reference"]


def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # equal covariances: the distance is the squared distance of the means
    assert frechet_distance(a, a + np.array([3.0, 0.0, 4.0])) == pytest.approx(25.0, rel=1e-6)
    # one dimension scaled by 2: (1 + 4 - 2 * 2) = 1 more, up to sampling
    assert frechet_distance(a, a * np.array([2.0, 1.0, 1.0])) == pytest.approx(1.0, rel=0.1)


def test_shapes_must_pair(data):
    cfg, train, test = data
    with pytest.raises(ValueError, match="same"):
        detectability(train, train[:-1], test, test, cfg)
