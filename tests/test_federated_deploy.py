"""A real deployment on loopback, started from the files ``fedeid deploy`` writes: a TLS SuperLink
with SuperNode authentication on loopback, nginx forwarding only the Fleet API, 3 hospitals
whose SuperNodes run only the pinned fedeid app, 2 rounds via ``flwr run``. Then the attacks:
an outsider's control calls through the hospitals' address, a foreign app submitted to the
hospitals (it tries to read each site's folder), an unregistered SuperNode. Every process started
here is stopped (process trees, finalizers), also on failure."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedeid.config import preset
from fedeid.federated.deploy import (ManagedProcess, _alive, flower_env, free_ports, logs_tail, run_cli,
                                     start_time, wait_for_port, wait_until, write_connection, write_run_config)
from fedeid.federated.runconfig import run_config_for
from fedeid.federated.simulation import project_dir

NGINX = shutil.which("nginx") or (Path("/usr/sbin/nginx") if Path("/usr/sbin/nginx").exists() else None)
if NGINX is None and os.environ.get("CI") == "true":  # .ci/run installs nginx-light
    raise RuntimeError("nginx is required for the deployment test under CI (apt-get install nginx-light)")
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx not installed (apt-get install nginx-light)")

FOREIGN_SERVER = '''
import json
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"cfg": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
            for n in nodes]
    replies = grid.send_and_receive(msgs, timeout=90)
    out = {str(r.metadata.src_node_id): (r.error.reason if r.has_error() else "ran") for r in replies}
    Path(context.run_config["out"]).write_text(json.dumps(out))
'''

FOREIGN_CLIENT = '''
import os
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.train()
def train(msg: Message, context: Context) -> Message:
    site = Path(str(context.node_config["state-dir"]))
    site.mkdir(parents=True, exist_ok=True)
    (site / "STOLEN").write_text("\\n".join(os.listdir(site)))  # an exfiltration would start here
    return Message(RecordDict(), reply_to=msg)
'''


def foreign_app(root: Path, out: Path) -> Path:
    app = root / "foreignapp"
    app.mkdir()
    (app / "server.py").write_text(FOREIGN_SERVER)
    (app / "client.py").write_text(FOREIGN_CLIENT)
    (app / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "foreignapp"
version = "1.0.0"

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "server:app"
clientapp = "client:app"

[tool.flwr.app.config]
out = "{out}"
''')
    return app


@pytest.fixture
def procs():
    started: list[ManagedProcess] = []
    stop = threading.Event()

    def watch() -> None:  # note children Flower detaches (SuperExec, ServerApp, ClientApps)
        while not stop.wait(0.5):
            for p in list(started):
                p.remember_tree()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield started
    finally:
        stop.set()
        watcher.join()
        for p in reversed(started):
            p.stop()
        left = [p.pid for p in started if _alive(p.pid)]
        left += [pid for p in started for pid, t in p._known.items() if _alive(pid) and start_time(pid) == t]
        assert not left, f"processes left running: {left}"


def test_perimeter_deployment(procs, tmp_path):
    app = project_dir()
    assert app is not None, "tests run from the project folder"
    fleet, link, runtime = free_ports(2 + 3)[:3]  # the 3 sites get runtime, runtime + 1, runtime + 2
    dep = tmp_path / "deploy"
    env = flower_env(tmp_path / "flwr-home-unused")
    out = run_cli([sys.executable, "-m", "fedeid.cli", "deploy", "--out", str(dep), "--sites", "3",
                   "--listen", f"127.0.0.1:{fleet}", "--fleet-port", str(fleet), "--superlink-port", str(link),
                   "--runtime-port", str(runtime), "--app", str(app)], env).stdout
    assert "FAB sha256" in out
    coord = dep / "coordinator"
    cenv = flower_env(coord / "flwr-home")

    def start(name: str, script: Path) -> ManagedProcess:
        p = ManagedProcess(name, ["bash", str(script)], tmp_path / "logs" / f"{name}.log", cenv).start()
        procs.append(p)
        return p

    superlink = start("superlink", coord / "start-superlink.sh")
    proxy = start("proxy", coord / "start-proxy.sh")
    wait_for_port(link, proc=superlink)
    wait_for_port(fleet, proc=proxy)
    assert run_cli(["bash", str(coord / "register-sites.sh")], cenv).stdout.count("registered successfully") == 3
    sites = [start(f"site-{i}", dep / f"site-{i}" / "start-site.sh") for i in range(3)]

    # an outsider who can reach the hospitals' address: no Control API, no Runtime API
    outsider = tmp_path / "outsider-home"
    write_connection(outsider, "stolen", f"127.0.0.1:{fleet}", root_certificates=dep / "site-0" / "ca.crt")
    oenv = flower_env(outsider)
    for cmd in (["ls"], ["supernode", "list"], ["supernode", "register", str(dep / "site-0" / "supernode.key.pub")],
                ["stop", "1"]):
        r = run_cli(["flwr", *cmd, "stolen"], oenv, check=False, timeout=60)
        assert r.returncode != 0 and "403" in r.stdout, r.stdout  # refused by the proxy, not a usage error
    with httpx.Client(verify=ssl.create_default_context(cafile=dep / "site-0" / "ca.crt"), timeout=10) as http:
        for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/acquire-task", "/docs",
                     "/health"):
            assert http.post(f"https://127.0.0.1:{fleet}{path}", content=b"").status_code == 403, path
        assert http.get(f"https://127.0.0.1:{fleet}/v1/fleet/pull-messages").status_code == 403  # POST only
        # a Fleet call does get through, and the SuperLink itself refuses it without a node signature
        assert http.post(f"https://127.0.0.1:{fleet}/v1/fleet/get-run", content=b"",
                         headers={"content-type": "application/protobuf"}).status_code in (401, 422)

    # the fedeid app, pinned by every site: 2 rounds
    cfg = preset("test")
    cfg.data.n_sites = 3
    cfg.fed.min_clients = 3
    cfg.fed.rounds = 2
    server_dir = tmp_path / "server"
    rc = write_run_config(run_config_for(cfg, out_dir=server_dir, threads=1, round_timeout=300.0, evaluate=False),
                          tmp_path / "run.toml")
    try:
        run_cli(["bash", str(coord / "run.sh"), "--run-config", str(rc)], cenv, timeout=480)
    except Exception:
        print(logs_tail(procs))
        raise
    metrics = json.loads((server_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for row in metrics["rounds"]:
        assert row["aggregated"] and row["valid_replies"] == 3 and row["failures"] == 0, row

    # a foreign app submitted through the coordinator's own Control API: refused at every site before it runs
    verdict = tmp_path / "foreign.json"
    foreign = foreign_app(tmp_path, verdict)
    r = run_cli(["bash", str(coord / "run.sh")], {**cenv, "FEDEID_APP": str(foreign)}, timeout=240, check=False)
    wait_until(verdict.exists, 60, what="the foreign ServerApp's verdict")
    replies = json.loads(verdict.read_text())
    assert len(replies) == 3 and all("app refused before it ran" in v for v in replies.values()), (replies, r.stdout)
    for i in range(3):
        assert not (dep / f"site-{i}" / "state" / "STOLEN").exists()
        assert "is not one this site pinned" in sites[i].log()
    assert all(s.running() for s in sites)  # a refused app does not take the site down

    # the global model of the pinned app de-identifies images with a site's own ReID
    from fedeid.checkpoint import load_checkpoint
    from fedeid.data.synthetic import generate_test
    from fedeid.deid.pipeline import DeIdentifier

    ckpt = load_checkpoint(server_dir / "global.pt")
    assert ckpt["reid_state"] is None
    assert all(k.startswith(("decoupler.", "decoder.")) for k in ckpt["shared_state"])
    deid = DeIdentifier.load(server_dir / "global.pt", reid=dep / "site-1" / "state" / "reid.pt", device="cpu")
    images = generate_test(cfg.data).images[:4]
    out, mask = deid.deidentify(images, 0.5)
    assert out.shape == images.shape and np.isfinite(out).all()
    assert 0.3 < mask.mean() < 0.7
    assert not np.allclose(out[mask], images[mask])
    assert (out[~mask] != images[~mask]).mean() > 0.99  # visible regions are re-rendered, never copied
    same, _ = deid.deidentify(images, 0.0)
    assert np.array_equal(same, images)


def test_refused_supernodes_exit_nonzero(procs, tmp_path):
    """``fedeid site run`` ends non-zero when the SuperLink refuses its SuperNode: an unregistered key
    (flower-supernode itself exits 1 here) and a node unregistered while running (flwr 1.42's
    SuperNode then logs "terminated gracefully" and exits 0)."""
    import re

    from fedeid.federated.site import EXIT_NODE_ENDED, EXIT_REFUSED
    from fedeid.privacy.certs import make_supernode_key

    app = project_dir()
    fleet, link, runtime = free_ports(2 + 2)[:3]  # the 2 sites get runtime and runtime + 1
    dep = tmp_path / "deploy"
    env = flower_env(tmp_path / "unused")
    run_cli([sys.executable, "-m", "fedeid.cli", "deploy", "--out", str(dep), "--sites", "2", "--listen",
             f"127.0.0.1:{fleet}", "--fleet-port", str(fleet), "--superlink-port", str(link), "--runtime-port",
             str(runtime), "--app", str(app)], env)
    coord = dep / "coordinator"
    cenv = flower_env(coord / "flwr-home")
    for name in ("superlink", "proxy"):
        procs.append(ManagedProcess(name, ["bash", str(coord / f"start-{name}.sh")], tmp_path / f"{name}.log",
                                    cenv).start())
    wait_for_port(link, proc=procs[0])
    wait_for_port(fleet, proc=procs[1])
    node_ids = re.findall(r"SuperNode (\d+) registered", run_cli(["bash", str(coord / "register-sites.sh")], cenv).stdout)
    assert len(node_ids) == 2
    # site-1 is started with a key nobody registered
    rogue_dir = dep / "site-1"
    make_supernode_key(rogue_dir / "rogue.key")
    toml = rogue_dir / "site.toml"
    toml.write_text(toml.read_text().replace('"supernode.key"', '"rogue.key"'))
    rogue = ManagedProcess("rogue", ["bash", str(rogue_dir / "start-site.sh")], tmp_path / "rogue.log", cenv).start()
    honest = ManagedProcess("site-0", ["bash", str(dep / "site-0" / "start-site.sh")], tmp_path / "site-0.log",
                            cenv).start()
    procs += [rogue, honest]
    wait_until(lambda: "SuperNode ID" in honest.log() or not honest.running(), 90, what="site-0 online")
    # the coordinator revokes site-0 (registered first) while it runs: its next heartbeat gets HTTP 401
    run_cli(["flwr", "supernode", "unregister", node_ids[0], "fedeid"], cenv)
    for proc, code in ((rogue, EXIT_REFUSED), (honest, EXIT_NODE_ENDED)):
        try:
            proc.popen.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{proc.name}: the refused SuperNode kept running:\n{proc.log()[-3000:]}")
        assert proc.popen.returncode in (EXIT_REFUSED, EXIT_NODE_ENDED), proc.log()[-3000:]
        assert proc.popen.returncode == code, proc.log()[-3000:]
    assert "refused this SuperNode" in rogue.log()
