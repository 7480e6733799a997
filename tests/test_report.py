"""The evaluation protocol end to end on a tiny synthetic benchmark: every figure, JSON and PNG."""

import json

import numpy as np
import pytest

from fedeid.config import preset
from fedeid.data.imageset import ImageSet
from fedeid.data.synthetic import generate
from fedeid.deid.pipeline import DeIdentifier
from fedeid.eval.benchmark import evaluate_and_report, methods_for
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
    d = DeIdentifier.build(cfg)
    results = evaluate_and_report(d, train, test, cfg, tmp_path, progress=False)
    methods = results["methods"]
    assert set(methods) == {"fedeid", "block", "blur", "pixelate", "dppix"}
    for m in methods.values():
        assert m["levels"] == list(cfg.eval.levels)
        for key in ("p_at_1", "adaptive_p_at_1", "map_at_r", "verification_auc", "utility_auc",
                    "utility_auc_retrained", "ssim", "psnr"):
            assert len(m[key]) == len(cfg.eval.levels), key
        # level 0 changes nothing: same figures for every method, perfect quality
        assert m["ssim"][0] == 1.0 and m["p_at_1"][0] == results["reference"]["p_at_1_original"]
        assert all(0.0 <= p <= 1.0 for p in m["p_at_1"])
        for macro, by_finding in zip(m["utility_auc"], m["utility_auc_by_finding"]):
            assert set(by_finding) <= set(cfg_findings(cfg)) and by_finding
            assert macro == pytest.approx(np.mean(list(by_finding.values())))
    assert results["reference"]["chance_p_at_1"] == pytest.approx(1 / 6)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["methods"]["fedeid"]["p_at_1"] == methods["fedeid"]["p_at_1"]
    assert (tmp_path / "privacy_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc = results["acceptance"]
    assert set(acc["dominates"]) == set(acc["dominates_adaptive"]) == {"block", "blur", "pixelate", "dppix"}
    assert "| fedeid | 0.0 |" in summary_table(results)


def test_acceptance_reads_the_figures():
    results = {
        "reference": {"chance_p_at_1": 0.05, "p_at_1_original": 0.9, "utility_auc_original": 0.8},
        "methods": {
            "fedeid": {"levels": [0, 0.5, 1], "p_at_1": [0.9, 0.3, 0.1], "utility_auc": [0.8, 0.78, 0.75]},
            "blur": {"levels": [0, 0.5, 1], "p_at_1": [0.9, 0.5, 0.3], "utility_auc": [0.8, 0.6, 0.55]},
        },
    }
    acc = acceptance(results)
    assert acc["p_at_1_level0_ge_0.8"] and acc["p_at_1_monotone_non_increasing"]
    assert acc["first_level_p_at_1_le_3x_chance"] == 1.0
    assert acc["utility_ratio_there"] == pytest.approx(0.75 / 0.8)
    assert acc["dominates"]["blur"]["dominates"]
    assert "dominates_adaptive" not in acc  # this run measured no adaptive attacker


def test_acceptance_judges_the_adaptive_attacker_too():
    """Blur looks private to the fixed attacker, but the adaptive one reads identity back."""
    results = {
        "reference": {"chance_p_at_1": 0.05, "p_at_1_original": 0.9, "utility_auc_original": 0.8},
        "methods": {
            "fedeid": {"levels": [0, 1], "p_at_1": [0.9, 0.3], "adaptive_p_at_1": [0.9, 0.3],
                       "utility_auc": [0.8, 0.7]},
            "blur": {"levels": [0, 1], "p_at_1": [0.9, 0.1], "adaptive_p_at_1": [0.9, 0.6],
                     "utility_auc": [0.8, 0.75]},
        },
    }
    acc = acceptance(results)
    assert not acc["dominates"]["blur"]["dominates"]
    assert acc["dominates_adaptive"]["blur"]["dominates"]


def test_acceptance_counts_p_at_1_exactly_three_times_chance():
    """60 patients, 180 queries: 9 hits is P@1 0.05, exactly 3 x chance, but chance (a mean of
    180 times 1/60, as reid_metrics computes it) rounds below 1/60."""
    chance = float(np.mean(np.full(180, 1 / 60)))
    assert 9 / 180 > 3 * chance  # the float trap this guards against
    results = {
        "reference": {"chance_p_at_1": chance, "p_at_1_original": 1.0, "utility_auc_original": 0.9},
        "methods": {"fedeid": {"levels": [0, 0.5, 1], "p_at_1": [1.0, 9 / 180, 0.0], "utility_auc": [0.9, 0.85, 0.8]}},
    }
    assert acceptance(results)["first_level_p_at_1_le_3x_chance"] == 0.5


def test_unknown_baseline_is_refused(bench):
    cfg, _, _ = bench
    cfg = preset("test")
    cfg.eval.baselines = ("blur", "sharpen")
    with pytest.raises(ValueError, match="unknown baseline 'sharpen'"):
        methods_for(DeIdentifier.build(cfg), cfg)
