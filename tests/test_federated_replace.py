"""Method B trained federated (``fed.method=replace``): the whole ``fedeid simulate --method
replace`` to a report, the global model loaded with a site's identity prior, the reply contract
across methods, and differential privacy accounted as for method A (in-process grid, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from PIL import Image

from fedeid.checkpoint import load_checkpoint
from fedeid.config import preset
from fedeid.deid.pipeline import DeIdentifier
from fedeid.deid.replace import ReplaceDeIdentifier
from fedeid.federated.inprocess import InProcessGrid
from fedeid.federated.runconfig import config_from_run, run_config_for, run_options
from fedeid.federated.server import run_federation
from fedeid.io import InputError
from fedeid.models.deid_model import build_deid_model, shared_state
from fedeid.privacy.accountant import CentralAccountant


@pytest.fixture(autouse=True)
def _flwr_home(tmp_path, monkeypatch):
    """Nothing of Flower's may touch ~/.flwr."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    torch.set_num_threads(1)


def _cfg(rounds: int = 1, **sets):
    cfg = preset("test")
    cfg.fed.method = "replace"
    cfg.fed.rounds = rounds
    for k, v in sets.items():
        cfg.set(k.replace("__", "."), v)
    return cfg


def _run(tmp_path, cfg, app=None, node_overrides=None, evaluate=False):
    from client.app import app as client_app

    rc = run_config_for(cfg, out_dir=tmp_path / "server", state_dir=tmp_path / "sites", threads=1, evaluate=evaluate)
    grid = InProcessGrid(app or client_app, [{"partition-id": i} for i in range(cfg.data.n_sites)], rc)
    for node, over in (node_overrides or {}).items():  # a site whose own run config says otherwise
        grid.contexts[1000 + node].run_config.update(over)
    return run_federation(grid, config_from_run(rc), run_options(rc))


def test_simulate_method_replace_reports_method_b_and_its_global_model_loads_with_a_site_prior(tmp_path):
    from fedeid.cli import main

    out = tmp_path / "report"
    assert main(["simulate", "--preset", "test", "--engine", "inprocess", "--method", "replace",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "federated" and results["config"]["fed"]["method"] == "replace"
    assert "replace" in results["methods"] and "fedeid" not in results["methods"] and "block" not in results["methods"]
    b = results["methods"]["replace"]
    assert b["levels"] == list(preset("test").eval.levels) and all(0 <= p <= 1 for p in b["worst_p_at_1"])
    assert b["ssim"][0] == 1.0 and b["ssim"][-1] < 1.0  # strength 0 is the input, above it is generated
    assert set(results["counterfactuals"]["findings"]) == set(preset("test").data.findings or
                                                             ("nodule", "effusion", "cardiomegaly", "opacity"))
    prior = results["replace"]["identity_prior"]
    assert 0 < prior["margin"] < 1 and prior["max_cos_accepted"] < prior["margin"]
    assert (out / "grid.png").exists() and (out / "privacy_utility.png").exists()

    fed = out / "federation"
    ckpt = load_checkpoint(fed / "global.pt")
    assert ckpt["method"] == "replace" and ckpt["reid_state"] is None and "identity_prior" not in ckpt["extra"]
    assert ckpt["shared_state"] and all(k.startswith(("heads.", "generator.")) for k in ckpt["shared_state"])
    site0 = fed / "sites" / "site-0"
    prior_path = site0 / "identity_prior.pt"
    pc = load_checkpoint(prior_path)
    assert not pc["shared_state"] and pc["reid_state"] is None  # the site's prior alone, no weights
    d = DeIdentifier.load(fed / "global.pt", prior=prior_path)
    assert isinstance(d, ReplaceDeIdentifier) and d.prior.report.margin == pytest.approx(prior["margin"])
    with pytest.raises(InputError, match=r"global\.pt: .*no identity prior.*--prior"):
        DeIdentifier.load(fed / "global.pt")
    with pytest.raises(InputError, match=r"reid\.pt: a ReID checkpoint goes with a method-A model"):
        DeIdentifier.load(fed / "global.pt", reid=site0 / "reid.pt")
    with pytest.raises(InputError, match=r"identity_prior\.pt: identity prior was fitted to other weights"):
        DeIdentifier.load(fed / "checkpoints" / "round-001.pt", prior=prior_path)  # round 1 != the final model
    with pytest.raises(InputError, match=r"reid\.pt: holds no method-B identity prior"):
        DeIdentifier.load(fed / "global.pt", prior=site0 / "reid.pt")

    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((80, 72)) * 255).astype(np.uint8)).save(images / "x.png")
    assert main(["deid", str(images), str(tmp_path / "deid"), "--model", str(fed / "global.pt"), "--prior",
                 str(prior_path), "--method", "replace", "--level", "1"]) == 0
    assert Image.open(tmp_path / "deid" / "x.png").size == (72, 80)


def test_a_reply_or_a_global_model_of_the_other_method_is_refused(tmp_path):
    from client.app import app as client_app

    cfg = _cfg()
    method_a = {k: Array(v.numpy()) for k, v in shared_state(build_deid_model(cfg)).items()}

    def method_a_app(msg, context):  # site 1 answers a method-B round with method A's arrays
        reply = client_app(msg, context)
        if msg.metadata.message_type == "train" and context.node_config["partition-id"] == 1:
            reply.content["arrays"] = ArrayRecord(method_a)
        return reply

    row = _run(tmp_path / "reply", cfg, app=method_a_app)["history"][0]
    assert row["valid_replies"] == 1 and row["failures"] == 1 and row["aggregated"]
    rejected = row["rejected"][0]
    assert rejected["kind"] == "contract"
    assert "arrays of method 'blocking', expected method 'replace'" in rejected["reason"]

    # a site configured for method A refuses the method-B global model before training on it
    row = _run(tmp_path / "site", cfg, node_overrides={1: {"fed.method": "blocking"}})["history"][0]
    assert row["valid_replies"] == 1 and row["rejected"][0]["kind"] == "error"
    assert "arrays of method 'replace', expected method 'blocking'" in row["rejected"][0]["reason"]


def test_local_and_central_dp_under_method_b_account_epsilon(tmp_path):
    result = _run(tmp_path / "local", _cfg(rounds=2, privacy__mode="local"))
    eps = [r["local_dp"]["epsilon_max"] for r in result["history"]]
    assert 0 < eps[0] < eps[1]  # each round's DP-SGD steps are composed onto the site's ledger
    for site, e in result["history"][-1]["local_dp"]["per_site"].items():
        ledger = json.loads((tmp_path / "local" / "sites" / f"site-{site}" / "privacy_ledger.json").read_text())
        assert ledger["epsilon"] == pytest.approx(e) and ledger["history"]

    cfg = _cfg(rounds=1, privacy__mode="central", privacy__noise_multiplier=1.0, privacy__clipping_norm=1e-3)
    result = _run(tmp_path / "central", cfg)
    acc = CentralAccountant(1.0, cfg.privacy.delta)
    acc.step(1.0)
    row = result["history"][0]
    assert row["valid_replies"] == 2 and row["central_dp"]["epsilon"] == pytest.approx(acc.epsilon())
    assert result["summary"]["central_dp"]["epsilon"] == pytest.approx(acc.epsilon())
    assert load_checkpoint(tmp_path / "central" / "server" / "global.pt")["method"] == "replace"


def test_resuming_with_the_other_method_is_refused(tmp_path):
    from fedeid.federated.checkpoints import check_resumable

    saved, current = _cfg(), _cfg()
    current.fed.method = "blocking"
    with pytest.raises(InputError, match=r"round-001\.pt: cannot resume: the checkpoint holds a 'replace' model"):
        check_resumable(saved, current, tmp_path / "round-001.pt")
    current = _cfg(replace__width=8)
    with pytest.raises(InputError, match="the replace configuration differs"):
        check_resumable(saved, current, tmp_path / "round-001.pt")
    current.fed.method = "bogus"
    from fedeid.federated.methods import federated_method
    with pytest.raises(ValueError, match="fed.method 'bogus' is not one of blocking, replace"):
        federated_method(current)


def test_dicom_deid_takes_a_site_prior_only_with_a_model(tmp_path, capsys):
    from fedeid.cli import main

    (tmp_path / "in").mkdir()
    assert main(["dicom", "deid", str(tmp_path / "in"), str(tmp_path / "out"), "--prior", str(tmp_path / "p.pt"),
                 "--secret-file", str(tmp_path / "secret")]) == 2
    assert "--prior goes with --model" in capsys.readouterr().err
