"""Secure aggregation (SecAgg+): with 3 sites the server receives masked vectors only, never a
site's update, yet recovers the mean of the site-clipped updates; central DP adds its noise and
counts the round; fedeid's own rounds run over it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedeid.config import preset
from fedeid.federated.arrays import ARRAYS_KEY, METRICS_KEY, spec_of
from fedeid.federated.inprocess import InProcessGrid
from fedeid.federated.runconfig import config_from_run, run_config_for, run_options
from fedeid.federated.secagg import secure_aggregation_mod, secure_train_round
from fedeid.federated.strategy import make_strategy


@pytest.fixture(autouse=True)
def _flwr_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


SHAPES = {"decoder.w": (4, 5), "decoder.b": (5,)}
RNG = np.random.default_rng(0)
DELTAS = {s: {k: RNG.normal(0, 0.2, shp) for k, shp in SHAPES.items()} for s in range(3)}
DELTAS[2] = {k: v * 40 for k, v in DELTAS[2].items()}  # far beyond C: the site clips it itself


def _app() -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secure_aggregation_mod])
    def train(msg: Message, context: Context) -> Message:
        site = int(context.node_config["site-id"])
        rec = msg.content[ARRAYS_KEY]
        new = ArrayRecord({k: Array((rec[k].numpy() + DELTAS[site][k]).astype(np.float32)) for k in rec.keys()})
        return Message(RecordDict({ARRAYS_KEY: new, METRICS_KEY: MetricRecord({"loss": float(site)})}),
                       reply_to=msg)

    return app


def _clipped(delta: dict[str, np.ndarray], c: float) -> dict[str, np.ndarray]:
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float32).astype(np.float64) ** 2)) for v in delta.values()))
    return {k: v * min(1.0, c / norm) for k, v in delta.items()}


@pytest.mark.parametrize("mode", ["none", "central"])
def test_server_holds_only_masked_vectors_and_gets_the_mean(mode):
    cfg = preset("test")
    cfg.privacy.mode = mode
    cfg.privacy.clipping_norm = 1.0
    cfg.privacy.noise_multiplier = 0.5
    seen: list[tuple[Message, Message]] = []
    grid = InProcessGrid(_app(), [{"site-id": i} for i in range(3)], {}, on_reply=lambda q, r: seen.append((q, r)))
    arrays = ArrayRecord({k: Array(RNG.normal(0, 1, shp).astype(np.float32)) for k, shp in SHAPES.items()})
    strategy = make_strategy(cfg, spec_of({}), min_replies=2)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"local-epochs": 1}), grid))
    new, metrics = secure_train_round(grid, strategy, 1, arrays, messages, cfg, timeout=30)

    # the server's whole view: 4 stages x 3 sites, no arrays in any reply, masked vectors only
    assert len(seen) == 12 and not any(r.has_error() for _, r in seen)
    masked = []
    for _, reply in seen:
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        conf = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in conf:
            masked.append([bytes_to_ndarray(b) for b in conf[Key.MASKED_PARAMETERS]])
    assert len(masked) == 3
    flat_true = [np.concatenate([_clipped(DELTAS[s], 1.0)[k].ravel() for k in SHAPES]) for s in range(3)]
    for vec in masked:  # [weight factor, *arrays], each masked: uniform mod 2^32, unrelated to any update
        assert [v.shape for v in vec[1:]] == list(SHAPES.values())
        flat = np.concatenate([v.ravel() for v in vec[1:]]).astype(np.float64)
        assert flat.std() > 1e8  # spread over the modulus, not over the update's scale (~0.2)
        for t in flat_true:
            assert abs(np.corrcoef(flat, t)[0, 1]) < 0.8

    info = strategy.round_info[1]
    assert info["aggregated"] and info["valid"] == 3 and info["secure_aggregation"]["participants"] == 3
    expected = {k: np.mean([_clipped(DELTAS[s], 1.0)[k] for s in range(3)], axis=0) for k in SHAPES}
    got = {k: new[k].numpy().astype(np.float64) - arrays[k].numpy().astype(np.float64) for k in SHAPES}
    err = max(float(np.max(np.abs(got[k] - expected[k]))) for k in SHAPES)
    if mode == "none":
        assert err < 1e-4, err
        assert "central_dp" not in info
    else:  # noise of std z*C/m = 0.5/3 on every coordinate, and the round is accounted
        resid = np.concatenate([(got[k] - expected[k]).ravel() for k in SHAPES])
        assert 0.08 < resid.std() < 0.3, resid.std()
        assert info["central_dp"]["releases"] == 1 and np.isfinite(info["central_dp"]["epsilon"])
        assert info["central_dp"]["clipped_at"] == "sites"
    assert metrics["loss"] == pytest.approx(1.0)


def test_plain_train_messages_pass_through():
    grid = InProcessGrid(_app(), [{"site-id": 0}], {})
    arrays = ArrayRecord({k: Array(np.zeros(shp, np.float32)) for k, shp in SHAPES.items()})
    msg = Message(RecordDict({ARRAYS_KEY: arrays, "config": ConfigRecord({})}), dst_node_id=1000, message_type="train")
    reply = list(grid.send_and_receive([msg]))[0]
    assert not reply.has_error()
    np.testing.assert_allclose(reply.content[ARRAYS_KEY]["decoder.b"].numpy(), DELTAS[0]["decoder.b"], atol=1e-6)


def test_fedeid_rounds_over_secure_aggregation(tmp_path):
    """fedeid's real ClientApp, 3 sites, central DP: no reply the server gets carries arrays."""
    from client.app import app as client_app
    from fedeid.federated.server import run_federation

    cfg = preset("test")
    cfg.data.n_sites = 3
    cfg.fed.rounds = 1
    cfg.fed.min_clients = 3
    cfg.fed.secure_aggregation = True
    cfg.privacy.mode = "central"
    seen: list[Message] = []
    rc = run_config_for(cfg, out_dir=tmp_path / "server", state_dir=tmp_path / "sites", threads=1, evaluate=False)
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(3)], rc,
                         on_reply=lambda q, r: seen.append(r))
    result = run_federation(grid, config_from_run(rc), run_options(rc))
    assert len(seen) == 12 and not any(r.has_error() for r in seen)
    assert all(len(rec) == 0 for r in seen for rec in r.content.array_records.values())
    row = json.loads((tmp_path / "server" / "metrics.json").read_text())["rounds"][0]
    assert row["aggregated"] and row["valid_replies"] == 3
    assert row["central_dp"]["clipped_at"] == "sites" and row["central_dp"]["releases"] == 1
    assert result["summary"]["central_dp"]["epsilon"] > 0
