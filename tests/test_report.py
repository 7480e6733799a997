"""The evaluation protocol end to end on a tiny synthetic benchmark: every figure, JSON and PNG."""

import copy
import json

import numpy as np
import pytest
from PIL import Image

from fedeid.cli import main
from fedeid.config import preset
from fedeid.data.imageset import ImageSet
from fedeid.data.synthetic import generate
from fedeid.deid.pipeline import DeIdentifier
from fedeid.eval.attackers import ATTACKERS
from fedeid.eval.benchmark import evaluate_and_report, methods_for
from fedeid.eval.calibration import calibrate, describe_level
from fedeid.eval.report import Evaluator, acceptance, split_gallery, summary_table
from fedeid.models.deid_model import cfg_findings


@pytest.fixture(scope="module")
def bench():
    cfg = preset("test")
    sites, test = generate(cfg.data)
    return cfg, ImageSet.concat(sites), test


def test_gallery_and_queries_split_every_patient(bench):
    _, _, test = bench
    gallery, queries = split_gallery(test)
    assert not set(gallery) & set(queries)
    assert len(gallery) + len(queries) == len(test)
    assert set(test.patient_ids[gallery]) == set(test.patient_ids[queries]) == set(test.patient_ids)


def test_report_has_every_figure_for_every_method_and_level(bench, tmp_path):
    cfg, train, test = bench
    cfg = copy.deepcopy(cfg)
    cfg.eval.baselines = ("blur", "block")  # one pixel and one model baseline: the suite costs per method
    d = DeIdentifier.build(cfg)
    results = evaluate_and_report(d, train, test, cfg, tmp_path, progress=False)
    methods = results["methods"]
    assert set(methods) == {"fedeid", "block", "blur"}
    assert results["attackers"] == list(ATTACKERS)
    for m in methods.values():
        assert m["levels"] == list(cfg.eval.levels)
        for key in ("worst_p_at_1", "worst_map_at_r", "worst_verification_auc", "worst_attacker", "p_at_1",
                    "adaptive_p_at_1", "utility_auc", "utility_auc_retrained", "ssim", "psnr"):
            assert len(m[key]) == len(cfg.eval.levels), key
        assert set(m["attacks"]) == set(ATTACKERS)
        for i in range(len(m["levels"])):
            per = [m["attacks"][a]["p_at_1"][i] for a in ATTACKERS]
            # the worst case is the strongest attacker, and names it
            assert m["worst_p_at_1"][i] == max(per)
            assert m["attacks"][m["worst_attacker"][i]]["p_at_1"][i] == max(per)
            for combined in ("model_holder", "fusion"):  # a matcher, or a fusion of some ("a+b", "all")
                used = m["attacks"][combined]["matcher"][i]
                assert used == "all" or set(used.split("+")) <= set(ATTACKERS), used
        # level 0 changes nothing: same figures for every method, perfect quality
        assert m["ssim"][0] == 1.0 and m["worst_p_at_1"][0] == results["reference"]["worst_p_at_1_original"]
        assert all(0.0 <= p <= 1.0 for p in m["worst_p_at_1"])
        for macro, by_finding in zip(m["utility_auc"], m["utility_auc_by_finding"]):
            assert set(by_finding) <= set(cfg_findings(cfg)) and by_finding
            assert macro == pytest.approx(np.mean(list(by_finding.values())))
    # SIFT and patch correlation find every level-0 query among 6 patients' originals
    assert results["reference"]["worst_p_at_1_original"] == 1.0
    assert results["reference"]["chance_p_at_1"] == pytest.approx(1 / 6)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["methods"]["fedeid"]["worst_p_at_1"] == methods["fedeid"]["worst_p_at_1"]
    assert (tmp_path / "privacy_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = Image.open(tmp_path / "grid.png")
    # 100 % zoom: 3 patients x fedeid, original + 3 levels, each tile at the image's own size
    assert grid.mode == "L" and grid.height > 3 * cfg.data.image_size and grid.width > 4 * cfg.data.image_size
    acc = results["acceptance"]
    assert set(acc["dominates"]) == {"block", "blur"}
    assert set(acc["dominates_by_attacker"]) == set(ATTACKERS)
    table = summary_table(results)
    assert "| fedeid | 0.0 |" in table and "| worst P@1 | by |" in table


def _entry(levels, worst, utility, **attacks):
    return {"levels": levels, "worst_p_at_1": worst, "utility_auc": utility,
            "attacks": {a: {"p_at_1": p} for a, p in attacks.items()}}


def test_acceptance_reads_the_worst_case():
    results = {
        "reference": {"chance_p_at_1": 0.05, "worst_p_at_1_original": 1.0, "utility_auc_original": 0.8},
        "methods": {
            "fedeid": _entry([0, 0.5, 1], [1.0, 0.3, 0.1], [0.8, 0.78, 0.75],
                             learned=[0.9, 0.1, 0.05], keypoint=[1.0, 0.3, 0.1]),
            "blur": _entry([0, 0.5, 1], [1.0, 0.5, 0.3], [0.8, 0.6, 0.55],
                           learned=[0.9, 0.05, 0.04], keypoint=[1.0, 0.5, 0.3]),
        },
    }
    acc = acceptance(results)
    assert acc["worst_p_at_1_level0_ge_0.95"] and acc["worst_p_at_1_monotone_non_increasing"]
    assert acc["first_level_worst_p_at_1_le_3x_chance"] == 1.0
    assert acc["utility_ratio_there"] == pytest.approx(0.75 / 0.8)
    assert acc["dominates"]["blur"]["dominates"]
    # blur fools the learned attacker alone (P@1 0.05 at AUC 0.6): per attacker, it is seen
    assert not acc["dominates_by_attacker"]["learned"]["blur"]
    assert acc["dominates_by_attacker"]["keypoint"]["blur"]


def test_acceptance_flags_a_worst_case_that_rises_with_the_level():
    results = {
        "reference": {"chance_p_at_1": 0.05, "worst_p_at_1_original": 0.9, "utility_auc_original": 0.8},
        "methods": {"fedeid": _entry([0, 0.5, 1], [0.9, 0.3, 0.4], [0.8, 0.7, 0.6], patch=[0.9, 0.3, 0.4])},
    }
    acc = acceptance(results)
    assert not acc["worst_p_at_1_level0_ge_0.95"] and not acc["worst_p_at_1_monotone_non_increasing"]
    assert acc["first_level_worst_p_at_1_le_3x_chance"] is None and acc["utility_ratio_ge_0.9"] is None


def test_acceptance_counts_p_at_1_exactly_three_times_chance():
    """60 patients, 180 queries: 9 hits is P@1 0.05, exactly 3 x chance, but chance (a mean of
    180 times 1/60, as similarity_metrics computes it) rounds below 1/60."""
    chance = float(np.mean(np.full(180, 1 / 60)))
    assert 9 / 180 > 3 * chance  # the float trap this guards against
    results = {
        "reference": {"chance_p_at_1": chance, "worst_p_at_1_original": 1.0, "utility_auc_original": 0.9},
        "methods": {"fedeid": _entry([0, 0.5, 1], [1.0, 9 / 180, 0.0], [0.9, 0.85, 0.8])},
    }
    assert acceptance(results)["first_level_worst_p_at_1_le_3x_chance"] == 0.5


def test_unknown_baseline_is_refused(bench):
    cfg, _, _ = bench
    cfg = preset("test")
    cfg.eval.baselines = ("blur", "sharpen")
    with pytest.raises(ValueError, match="unknown baseline 'sharpen'"):
        methods_for(DeIdentifier.build(cfg), cfg)


def _table(**change):
    table = {"levels": [0.0, 0.5, 1.0], "worst_p_at_1": [1.0, 0.4, 0.05], "worst_attacker": ["keypoint", "patch",
             "model_holder"], "chance_p_at_1": 1 / 30, "n_patients": 30, "n_queries": 60}
    return {**table, **change}


def test_describe_level_states_the_measured_figure():
    from scipy.stats import beta

    bound = beta.ppf(0.95, 13, 18)  # 12 of 30 patients found
    assert describe_level(_table(), 0.5) == ("level 0.5: re-identification measured at calibration: worst-case "
                                             f"P@1 0.400 at level 0.5 (95 % upper bound {bound:.3f}; strongest "
                                             "attacker: patch) (chance 0.033; 30 held-out patients)")
    between = describe_level(_table(), 0.7)
    assert "not calibrated itself" in between and "0.400 at level 0.5" in between and "0.050 at level 1" in between
    assert "no calibration" in describe_level(None, 0.3)


def test_upper_bound_known_answers():
    from fedeid.eval.calibration import upper_bound

    assert upper_bound(0.0, 30) == pytest.approx(1 - 0.05 ** (1 / 30))  # none found: 0.095, not 0
    assert upper_bound(1.0, 30) == 1.0
    assert 0.083 < upper_bound(0.083, 30) < upper_bound(0.083, 10)  # fewer patients, wider bound
    assert upper_bound(0.5, 10_000) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("change, reason", [
    ({"levels": [0.0, 1.0]}, "differ in length"),
    ({"levels": [0.0, 0.5, 1.5]}, "within"),
    ({"levels": [0.5, 0.0, 1.0]}, "within"),
    ({"worst_p_at_1": [1.0, float("nan"), 0.1]}, "non-finite"),
    ({"worst_p_at_1": [1.0, 2.0, 0.1]}, "out of range"),
    ({"chance_p_at_1": "x"}, "malformed"),
])
def test_a_hostile_calibration_table_is_refused(change, reason):
    with pytest.raises(ValueError, match=reason):
        describe_level(_table(**change), 0.5)
    with pytest.raises(ValueError, match="not a table"):
        describe_level([1, 2], 0.5)


def test_calibration_is_measured_on_held_out_patients(bench):
    cfg, train, test = bench
    cfg = copy.deepcopy(cfg)
    cfg.eval.attackers = ("keypoint", "patch")  # the cheap ones: this checks the bookkeeping
    table = calibrate(DeIdentifier.build(cfg), train, test, cfg, levels=(0.0, 1.0))
    assert table["levels"] == [0.0, 1.0] and table["worst_p_at_1"][0] == 1.0  # originals: found
    assert table["attackers"] == ["keypoint", "patch"] and set(table["worst_attacker"]) <= {"keypoint", "patch"}
    assert table["n_patients"] == 6 and table["chance_p_at_1"] == pytest.approx(1 / 6)
    assert "worst-case P@1 1.000 at level 0" in describe_level(table, 0.0)


def test_deid_prints_what_the_level_bought(tmp_path, capsys):
    cfg = preset("test")
    model = tmp_path / "model.pt"
    DeIdentifier.build(cfg).save(model, extra={"calibration": _table()})
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((64, 64)).astype(np.float32))
    assert main(["deid", str(tmp_path / "x.npy"), str(tmp_path / "out"), "--model", str(model), "--level", "0.5"]) == 0
    assert "worst-case P@1 0.400 at level 0.5 (95 % upper bound 0.566; strongest attacker: patch)" in capsys.readouterr().out
    DeIdentifier.build(cfg).save(model, extra={"calibration": _table(worst_p_at_1=[1.0, 7.0, 0.0])})
    assert main(["deid", str(tmp_path / "x.npy"), str(tmp_path / "out2"), "--model", str(model), "--level", "0.5"]) == 0
    assert f"fedeid: {model}: calibration ignored: calibration figures out of range" in capsys.readouterr().err


def test_level_zero_is_shared_only_by_methods_that_leave_the_images_unchanged(bench):
    """A decoder that re-synthesises visible regions changes images at level 0: it gets its own row."""
    _, _, test = bench

    class Recording(Evaluator):
        def __init__(self) -> None:  # no networks: this checks run()'s bookkeeping only
            self.test, self.progress, self.queries, self.calls = test, False, np.arange(2), []

        def score(self, method, level, adaptive=True):
            self.calls.append(level)
            figures = {"p_at_1": 1.0, "map_at_r": 1.0, "matcher": "patch"}
            return {"worst_p_at_1": float(method(test.images, level).mean()), "worst_attacker": "patch",
                    "chance_p_at_1": 0.1, "utility_auc": 0.8, "utility_auc_by_finding": {}, "attacks": {"patch": figures}}

    ev = Recording()
    results = ev.run({"a": lambda im, lv: im, "b": lambda im, lv: im * (1 - lv),
                      "resynth": lambda im, lv: im * 0.5}, (0.0, 1.0))
    assert ev.calls == [0.0, 1.0, 1.0, 0.0, 1.0]  # b reuses a's level 0, resynth does not
    assert results["methods"]["resynth"]["worst_p_at_1"][0] == pytest.approx(0.5 * test.images.mean())
    assert results["methods"]["b"]["attacks"]["patch"]["matcher"] == ["patch", "patch"]
    assert results["reference"]["worst_p_at_1_original"] == pytest.approx(float(test.images.mean()))
