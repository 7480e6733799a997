"""A real deployment on loopback: TLS SuperLink with SuperNode authentication, 3 SuperNodes,
2 rounds via ``flwr run``; the saved global checkpoint de-identifies images; an unregistered
SuperNode is refused. Every process started here is stopped (process trees, finalizers)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from fedeid.config import preset
from fedeid.federated.deploy import Deployment, _alive, logs_tail, start_time
from fedeid.federated.runconfig import run_config_for
from fedeid.federated.simulation import project_dir
from fedeid.privacy.certs import create_certificates



@pytest.fixture
def deployment(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    certs = create_certificates(tmp_path / "certs", n_nodes=4)
    dep = Deployment(tmp_path / "dep", certs=certs, auth=True)
    try:
        yield dep, certs
    finally:
        dep.close()
        left = [proc.pid for proc in dep.processes() if _alive(proc.pid)]
        left += [p for proc in dep.processes() for p, started in proc._known.items()
                 if _alive(p) and start_time(p) == started]  # same pid AND same process
        assert not left, f"processes left running: {left}"


def test_tls_deployment_two_rounds_and_unregistered_node_refused(deployment, tmp_path):
    dep, certs = deployment
    app = project_dir()
    assert app is not None, "tests run from the project folder"
    cfg = preset("test")
    cfg.data.n_sites = 3
    cfg.fed.min_clients = 3
    cfg.fed.rounds = 2
    dep.start_superlink()
    assert dep.flwr_home.joinpath("config.toml").read_text().count("root-certificates") == 1
    for pub in certs.node_public_keys[:3]:
        assert "registered successfully" in dep.register(pub)
    for i in range(3):
        dep.start_supernode(f"site-{i}", private_key=certs.node_keys[i],
                            node_config={"site-id": i, "state-dir": str(tmp_path / f"site-{i}")})
    # a SuperNode whose key was never registered: started now, checked after the run
    rogue = dep.start_supernode("rogue", private_key=certs.node_keys[3], node_config={"site-id": 0})

    server_dir = tmp_path / "server"
    # evaluate=False: the clients' evaluate step is covered in-process (test_federated_rounds);
    # here every message costs a ClientApp process start-up on 2 cores
    run_config = run_config_for(cfg, out_dir=server_dir, threads=1, round_timeout=300.0, evaluate=False)
    try:
        dep.run(app, run_config=run_config, timeout=480)
    except Exception:
        print(logs_tail(dep.processes()))
        raise

    deadline = time.monotonic() + 60
    while rogue.running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not rogue.running() and rogue.popen.returncode != 0, logs_tail([rogue])
    assert "Failed to activate SuperNode" in rogue.log(), rogue.log()[-2000:]
    metrics = json.loads((server_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for row in metrics["rounds"]:
        assert row["aggregated"] and row["valid_replies"] == 3 and row["failures"] == 0, row
        assert sorted(int(c["site-id"]) for c in row["clients"]) == [0, 1, 2]  # never the rogue
    assert (server_dir / "checkpoints" / "round-002.pt").exists()

    # the global model (no ReID inside) + a site's own ReID de-identify images
    from fedeid.checkpoint import load_checkpoint
    from fedeid.data.synthetic import generate_test
    from fedeid.deid.pipeline import DeIdentifier

    ckpt = load_checkpoint(server_dir / "global.pt")
    assert ckpt["reid_state"] is None
    assert all(k.startswith(("decoupler.", "decoder.")) for k in ckpt["shared_state"])
    deid = DeIdentifier.load(server_dir / "global.pt", reid=tmp_path / "site-1" / "reid.pt", device="cpu")
    images = generate_test(cfg.data).images[:4]
    out, mask = deid.deidentify(images, 0.5)
    assert out.shape == images.shape and np.isfinite(out).all()
    assert 0.3 < mask.mean() < 0.7
    assert not np.allclose(out[mask], images[mask])
    assert (out[~mask] != images[~mask]).mean() > 0.99  # visible regions are re-rendered, never copied
    same, _ = deid.deidentify(images, 0.0)
    assert np.array_equal(same, images)
