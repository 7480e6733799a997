"""simulations/variants.py: how a variant is spelled and how its seeds are summarised."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fedeid.config import preset


def _module():
    path = Path(__file__).resolve().parents[1] / "simulations" / "variants.py"
    spec = importlib.util.spec_from_file_location("variants", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variant_spelling_and_config():
    v = _module()
    assert v.parse_variant("base=") == ("base", [])
    name, pairs = v.parse_variant("big=model.reid_size=128;train.deid_epochs=5")
    assert name == "big" and pairs == [("model.reid_size", "128"), ("train.deid_epochs", "5")]
    for bad in ("noequals", "=model.reid_size=1", "x=model.reid_size"):
        with pytest.raises(ValueError):
            v.parse_variant(bad)
    base = preset("test")
    cfg = v.configure(base, pairs, seed=7)
    assert (cfg.model.reid_size, cfg.train.deid_epochs, cfg.train.seed) == (128, 5, 7)
    assert base.model.reid_size != 128 and base.train.seed != 7  # the base is never changed


def test_summary_over_seeds_is_mean_sd_min_max():
    v = _module()
    rows = [{"worst_p_at_1": 0.1, "utility_auc": 0.6, "utility_auc_retrained": None},
            {"worst_p_at_1": 0.3, "utility_auc": 0.8, "utility_auc_retrained": None}]
    s = v.summarise(rows)
    assert s["worst_p_at_1"] == pytest.approx({"mean": 0.2, "sd": 0.1414213562, "min": 0.1, "max": 0.3})
    assert s["utility_auc"]["mean"] == pytest.approx(0.7)
    assert "utility_auc_retrained" not in s  # no seed had it
