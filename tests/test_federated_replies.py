"""Every client reply holds only the decoupler/decoder arrays (names and shapes equal to those
modules' state) and scalar metrics: no pixels, no per-image features, no ReID weights.

The ClientApp object of ``client/app.py`` is called on Flower ``Message`` objects built by the
real strategy (in-process grid), and every reply is inspected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedeid.config import preset
from fedeid.federated.arrays import reply_problems, spec_of
from fedeid.federated.inprocess import InProcessGrid
from fedeid.federated.runconfig import config_from_run, run_config_for, run_options
from fedeid.federated.server import run_federation
from fedeid.models.deid_model import build_deid_model, shared_state



@pytest.fixture(autouse=True)
def _flwr_home(tmp_path, monkeypatch):
    """Nothing of Flower's may touch ~/.flwr."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))

def _cfg(mode: str = "none"):
    cfg = preset("test")
    cfg.fed.rounds = 1
    cfg.privacy.mode = mode
    return cfg


def _run_and_capture(tmp_path, cfg):
    from client.app import app as client_app

    captured: list[tuple[Message, Message]] = []
    rc = run_config_for(cfg, out_dir=tmp_path / "server", state_dir=tmp_path / "sites", threads=1)
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(cfg.data.n_sites)], rc,
                         on_reply=lambda m, r: captured.append((m, r)))
    run_federation(grid, config_from_run(rc), run_options(rc))
    return captured


@pytest.mark.parametrize("mode", ["none", "local"])
def test_every_reply_is_shared_arrays_and_scalars_only(tmp_path, mode):
    torch.set_num_threads(1)
    cfg = _cfg(mode)
    captured = _run_and_capture(tmp_path / mode, cfg)
    model = build_deid_model(cfg)
    shared = shared_state(model)
    expected = {k: tuple(v.shape) for k, v in shared.items()}
    allowed_bytes = sum(v.numel() * v.element_size() for v in shared.values())
    n_images = cfg.data.patients_per_site * cfg.data.images_per_patient
    kinds = {"train": 0, "evaluate": 0}
    for msg, reply in captured:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        kind = msg.metadata.message_type
        kinds[kind] += 1
        content = reply.content
        assert not content.config_records
        assert set(content.metric_records) == {"metrics"}
        for key, value in content["metrics"].items():
            assert type(value) in (int, float), f"{key}: {type(value).__name__}"  # scalars, not lists
        if kind == "train":
            assert set(content.keys()) == {"arrays", "metrics"}
            arrays = content["arrays"]
            got = {k: tuple(a.shape) for k, a in arrays.items()}
            assert got == expected  # exactly the decoupler/decoder state: same names, same shapes
            assert all(k.startswith(("decoupler.", "decoder.")) and "_module" not in k for k in got)
            assert sum(int(np.prod(s)) * 4 for s in got.values()) == allowed_bytes
            # nothing shaped like images or per-image features rides along
            assert not any(s and s[0] == n_images for s in got.values())
            assert not any("reid" in k or "encoder" in k for k in got)
            assert content["metrics"]["num-examples"] > 0
            if mode == "local":
                assert content["metrics"]["epsilon"] > 0
        else:
            assert set(content.keys()) == {"metrics"} and not content.array_records
            assert "local-p-at-1" in content["metrics"] and "local-ssim" in content["metrics"]
        assert reply_problems(content, spec_of(shared), train=kind == "train") == []
    assert kinds == {"train": cfg.data.n_sites, "evaluate": cfg.data.n_sites}


def test_contract_check_catches_leaks():
    cfg = _cfg()
    state = shared_state(build_deid_model(cfg))
    spec = spec_of(state)
    good = {k: Array(v.numpy()) for k, v in state.items()}
    ok = RecordDict({"arrays": ArrayRecord(good), "metrics": MetricRecord({"num-examples": 3, "loss": 0.1})})
    assert reply_problems(ok, spec) == []
    leaky = dict(good, **{"reid.features.0.weight": Array(np.zeros((4, 1, 3, 3), np.float32))})
    assert reply_problems(RecordDict({"arrays": ArrayRecord(leaky), "metrics": MetricRecord({"num-examples": 3})}),
                          spec)
    pixels = RecordDict({"arrays": ArrayRecord(good), "metrics": MetricRecord({"num-examples": 3}),
                         "images": ArrayRecord({"x": Array(np.zeros((3, 64, 64), np.float32))})})
    assert reply_problems(pixels, spec)
    per_image = RecordDict({"arrays": ArrayRecord(good),
                            "metrics": MetricRecord({"num-examples": 3, "per-image": [0.1, 0.2, 0.3]})})
    assert any("not a scalar" in p for p in reply_problems(per_image, spec))
    reshaped = dict(good)
    k0 = next(iter(reshaped))
    reshaped[k0] = Array(np.zeros((1,), np.float32))
    assert reply_problems(RecordDict({"arrays": ArrayRecord(reshaped), "metrics": MetricRecord({"num-examples": 3})}),
                          spec)
    extra_cfg = RecordDict({"arrays": ArrayRecord(good), "metrics": MetricRecord({"num-examples": 3}),
                            "config": ConfigRecord({"note": "x"})})
    assert reply_problems(extra_cfg, spec)


def test_server_drops_a_reply_that_breaks_the_contract(tmp_path):
    """A site that adds a tensor to its reply is counted as a failure and left out of the average."""
    from client.app import app as client_app

    cfg = _cfg()

    def leaky_app(msg, context):
        reply = client_app(msg, context)
        if msg.metadata.message_type == "train" and context.node_config["partition-id"] == 1:
            arrays = dict(reply.content["arrays"].items())
            arrays["reid.leak"] = Array(np.zeros((2, 2), np.float32))
            reply.content["arrays"] = ArrayRecord(arrays)
        return reply

    rc = run_config_for(cfg, out_dir=tmp_path / "server", state_dir=tmp_path / "sites", threads=1, evaluate=False)
    grid = InProcessGrid(leaky_app, [{"partition-id": i} for i in range(2)], rc)
    result = run_federation(grid, config_from_run(rc), run_options(rc))
    row = result["history"][0]
    assert row["valid_replies"] == 1 and row["failures"] == 1 and row["aggregated"]
    assert "unexpected arrays" in row["rejected"][0]["reason"]
