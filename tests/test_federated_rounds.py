"""Server rounds with the real ServerApp logic and ClientApp (in-process grid, no Ray):
drop-outs, killing the server and resuming, central DP clipping/noise/accounting, FedProx,
the clients' evaluate step, and the run-config bridge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedeid.checkpoint import load_checkpoint
from fedeid.config import Config, preset
from fedeid.federated.inprocess import InProcessGrid
from fedeid.federated.runconfig import config_from_run, config_keys, run_config_for, run_options
from fedeid.federated.server import run_federation
from fedeid.privacy.accountant import CentralAccountant

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(autouse=True)
def _flwr_home(tmp_path, monkeypatch):
    """Nothing of Flower's may touch ~/.flwr."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))

def _cfg(rounds: int = 2, **sets):
    cfg = preset("test")
    cfg.fed.rounds = rounds
    for k, v in sets.items():
        cfg.set(k.replace("__", "."), v)
    return cfg


def _grid(tmp_path, cfg, app=None, **kw):
    from client.app import app as client_app

    rc = run_config_for(cfg, out_dir=tmp_path / "server", state_dir=tmp_path / "sites", threads=1,
                        **kw.pop("options", {}))
    return InProcessGrid(app or client_app, [{"partition-id": i} for i in range(cfg.data.n_sites)], rc, **kw), rc


def _flat(state):
    return torch.cat([v.flatten().double() for v in state.values()])


def test_dropouts_are_tolerated_and_min_replies_enforced(tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg(rounds=2)
    cfg.data.n_sites = 3
    cfg.fed.min_clients = 3
    from client.app import app as client_app

    def flaky(msg, context):
        if msg.metadata.message_type == "train" and context.node_config["partition-id"] == 2:
            raise RuntimeError("site 2 lost power")
        return client_app(msg, context)

    # round 1: site 1 vanishes mid-round (no reply), site 2 fails; round 2: only site 2 fails
    drop = lambda rnd, node, msg: rnd == 1 and node == 1001 and msg.metadata.message_type == "train"  # noqa: E731
    grid, rc = _grid(tmp_path, cfg, app=flaky, drop=drop, options={"evaluate": False})
    result = run_federation(grid, config_from_run(rc), run_options(rc))
    r1, r2 = result["history"]
    assert (r1["valid_replies"], r1["failures"], r1["aggregated"]) == (1, 2, True)
    assert (r2["valid_replies"], r2["failures"], r2["aggregated"]) == (2, 1, True)
    assert "site 2 lost power" in " ".join(x["reason"] for x in r2["rejected"])

    # with min-replies 2 a round with one valid reply keeps the global model unchanged
    grid, rc = _grid(tmp_path / "strict", cfg, app=flaky, drop=drop, options={"evaluate": False, "min_replies": 2})
    result = run_federation(grid, config_from_run(rc), run_options(rc))
    r1 = result["history"][0]
    assert not r1["aggregated"]
    start = load_checkpoint(tmp_path / "strict" / "server" / "checkpoints" / "round-001.pt")["shared_state"]
    from fedeid.federated.server import initial_model
    from fedeid.models.deid_model import shared_state

    assert torch.equal(_flat(start), _flat(shared_state(initial_model(config_from_run(rc)))))


KILL_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import torch; torch.set_num_threads(1)
    from fedeid.config import Config
    from fedeid.federated.simulation import simulate
    cfg = Config.from_dict(json.loads(sys.argv[1]))
    simulate(cfg, sys.argv[2], engine="inprocess", evaluate=False)
""")


def test_killed_server_resumes_at_next_round_from_checkpoint(tmp_path):
    """SIGKILL the server process after round k; resuming trains round k+1 from checkpoint k."""
    cfg = _cfg(rounds=3, privacy__mode="central", privacy__noise_multiplier=2.0, privacy__clipping_norm=5.0)
    out = tmp_path / "sim"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT)),
                             json.dumps(cfg.to_dict()), str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    state_path = out / "federation" / "state.json"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if state_path.exists() and json.loads(state_path.read_text())["round"] >= 1:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    k = json.loads(state_path.read_text())["round"]
    assert 1 <= k < 3
    assert not (out / "federation" / "global.pt").exists()
    ckpt_k = load_checkpoint(out / "federation" / "checkpoints" / f"round-{k:03d}.pt")

    sent = []
    from client.app import app as client_app

    def spy(msg, context):
        sent.append((msg.metadata.message_type, int(msg.content["config"]["server-round"]),
                     {k2: torch.from_numpy(a.numpy().copy()) for k2, a in msg.content["arrays"].items()}))
        return client_app(msg, context)

    fed = out / "federation"
    rc = run_config_for(cfg, out_dir=fed, state_dir=fed / "sites", threads=1, resume=True, evaluate=False)
    grid = InProcessGrid(spy, [{"partition-id": i} for i in range(cfg.data.n_sites)], rc)
    result = run_federation(grid, config_from_run(rc), run_options(rc))
    first_round = min(r for _, r, _ in sent)
    assert first_round == k + 1
    for _, r, arrays in sent:
        if r == k + 1:  # the resumed round starts from exactly the checkpoint of round k
            assert torch.equal(_flat(arrays), _flat(ckpt_k["shared_state"]))
    metrics = json.loads((fed / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert result["summary"]["resumed_from"] == k
    # the central DP accountant resumed too: 3 releases in total
    acc = CentralAccountant(2.0, cfg.privacy.delta)
    for _ in range(3):
        acc.step(1.0)
    assert result["summary"]["central_dp"]["releases"] == 3
    assert result["summary"]["central_dp"]["epsilon"] == pytest.approx(acc.epsilon())
    assert (fed / "global.pt").exists()


def test_central_dp_clips_adds_noise_and_reports_epsilon(tmp_path):
    torch.set_num_threads(1)
    from fedeid.federated.server import initial_model
    from fedeid.models.deid_model import shared_state

    # no noise, tiny clip: the global update is the mean of updates each clipped to norm C
    cfg = _cfg(rounds=1, privacy__mode="central", privacy__noise_multiplier=0.0, privacy__clipping_norm=1e-3)
    grid, rc = _grid(tmp_path / "clip", cfg, options={"evaluate": False})
    result = run_federation(grid, config_from_run(rc), run_options(rc))
    start = _flat(shared_state(initial_model(cfg)))
    after = _flat(load_checkpoint(tmp_path / "clip" / "server" / "global.pt")["shared_state"])
    row = result["history"][0]
    assert min(row["central_dp"]["update_norms"]) > 1e-3  # the clip was active
    assert float((after - start).norm()) <= 1e-3 * (1 + 1e-4)

    # noise: std z*C/m per coordinate on the averaged update; epsilon grows per round
    cfg = _cfg(rounds=2, privacy__mode="central", privacy__noise_multiplier=1.0, privacy__clipping_norm=1e-3)
    grid, rc = _grid(tmp_path / "noise", cfg, options={"evaluate": False})
    result = run_federation(grid, config_from_run(rc), run_options(rc))
    after = _flat(load_checkpoint(tmp_path / "noise" / "server" / "checkpoints" / "round-001.pt")["shared_state"])
    delta = (after - start).numpy()
    m = result["history"][0]["valid_replies"]
    assert np.std(delta) == pytest.approx(1.0 * 1e-3 / m, rel=0.05)
    eps = [r["central_dp"]["epsilon"] for r in result["history"]]
    assert 0 < eps[0] < eps[1]
    acc = CentralAccountant(1.0, cfg.privacy.delta)
    acc.step(1.0)
    assert eps[0] == pytest.approx(acc.epsilon())


def test_fedprox_and_local_evaluation(tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg(rounds=1, fed__strategy="fedprox", fed__proximal_mu=0.5)
    seen = []
    grid, rc = _grid(tmp_path, cfg, on_reply=lambda m, r: seen.append((m, r)))
    result = run_federation(grid, config_from_run(rc), run_options(rc))
    train_msgs = [m for m, _ in seen if m.metadata.message_type == "train"]
    assert train_msgs and all(m.content["config"]["proximal-mu"] == 0.5 for m in train_msgs)
    ev = result["history"][0]["evaluate_metrics"]
    for key in ("local-p-at-1", "local-p-at-1-original", "local-ssim", "blocked-fraction"):
        assert key in ev
    assert 0.0 <= ev["local-p-at-1"] <= 1.0
    # each site trained its ReID once and kept it on its disk
    for i in range(cfg.data.n_sites):
        ck = load_checkpoint(tmp_path / "sites" / f"site-{i}" / "reid.pt")
        assert ck["reid_state"] and not ck["shared_state"]


def test_run_config_bridge_and_pyproject_table():
    cfg = preset("test")
    cfg.fed.rounds = 7
    rc = run_config_for(cfg, out_dir="x")
    assert config_from_run(rc) == cfg  # the whole Config travels
    # "" keeps the preset's value; a set key overrides it (as `flwr run --run-config` does)
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config_from_run({**table, "fedeid.preset": "test"}) == preset("test")
    over = config_from_run({**table, "fedeid.preset": "test", "fed.rounds": 5, "privacy.mode": "local"})
    assert over.fed.rounds == 5 and over.privacy.mode == "local"
    known = set(config_keys(Config()))
    dotted = [k for k in table if not k.startswith("fedeid.")]
    assert set(dotted) <= known  # no typo'd key in the table
    assert {k for k in known if k.split(".")[0] in ("fed", "privacy")} <= set(dotted)
    opts = run_options({**table, "fedeid.out-dir": "/tmp/x", "fedeid.resume": "true"})
    assert opts.resume and opts.out_dir == Path("/tmp/x")


def test_simulate_command_writes_the_report(tmp_path):
    """The main job's command end to end on the test preset (in-process engine: no Ray in CI)."""
    from fedeid.cli import main

    out = tmp_path / "report"
    assert main(["simulate", "--preset", "test", "--engine", "inprocess", "--out", str(out)]) == 0
    for name in ("results.json", "privacy_utility.png", "federated.json", "federated_rounds.png",
                 "federation/global.pt", "federation/sites/site-0/reid.pt"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "federated" and "fedeid" in results["methods"]
    fed = json.loads((out / "federated.json").read_text())["summary_table"]
    assert 0 < fed["shared_fraction_of_full_model"] < 1 and fed["rounds"] == preset("test").fed.rounds
    # the global model states what each level bought on the held-out patients (fedeid deid prints it)
    from fedeid.deid.pipeline import DeIdentifier

    deid = DeIdentifier.load(out / "federation/global.pt", reid=out / "federation/sites/site-0/reid.pt")
    table = deid.info["calibration"]
    assert table["levels"] == list(preset("test").eval.levels) and table["site"] == 0
    assert table["worst_p_at_1"] == results["methods"]["fedeid"]["worst_p_at_1"]


def test_round_watcher_prints_one_line_per_new_round(tmp_path, capsys):
    from fedeid.federated.simulation import RoundWatcher

    path = tmp_path / "metrics.json"
    row = {"round": 1, "valid_replies": 2, "sampled": 3, "rejected": [7],
           "train_metrics": {"rec": 0.25, "task": 0.5}, "central_dp": {"epsilon": 1.5}}
    path.write_text(json.dumps({"rounds": [row]}))  # a resumed run's first round: not news
    with RoundWatcher(path, rounds=3, poll_seconds=0.01):
        path.write_text(json.dumps({"rounds": [row, {**row, "round": 2}, {**row, "round": 3}]}))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("federated:")]
    assert len(lines) == 2
    assert lines[0].startswith("federated: 1/2 rounds")
    assert "round 2: 2/3 valid replies, 1 rejected, reconstruction 0.250, finding loss 0.500, ε 1.50" in lines[0]
    assert "round 3" in lines[1]
