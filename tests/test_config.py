"""The one config object: presets, dotted overrides (Flower run config), round trips."""

import pytest

from fedeid.config import Config, preset


def test_round_trip_through_dict():
    cfg = preset("full")
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_dotted_overrides_coerce_types_and_accept_hyphens():
    cfg = Config().override({"fed.rounds": "5", "train.deid-epochs": 7, "eval.levels": "0,0.5,1",
                             "model.decouple": "false", "other-app.key": 1})
    assert cfg.fed.rounds == 5 and cfg.train.deid_epochs == 7
    assert cfg.eval.levels == (0.0, 0.5, 1.0)
    assert cfg.model.decouple is False


def test_unknown_keys_and_bad_values_are_errors():
    cfg = Config()
    with pytest.raises(KeyError, match="unknown config key"):
        cfg.set("train.epochz", 1)
    with pytest.raises(ValueError, match="train.lr"):
        cfg.set("train.lr", "fast")
    with pytest.raises(ValueError, match="preset"):
        preset("huge")
