"""Run a federation of synthetic hospitals on one machine.

Two engines run the same ServerApp logic (:func:`fedeid.federated.server.run_federation`) and the
same ClientApp object (``client.app:app``):

* ``flwr`` — Flower's simulation runtime: a ``flower-superlink --simulation`` of ours (own
  ``FLWR_HOME`` under the output folder, ``--disable-runtime-dependency-installation``, a free
  port), ``flwr run <project> <connection> --federation-config "num-supernodes=N ..."``; Ray
  runs one virtual SuperNode per site, one CPU each. The SuperLink and everything it started
  (SuperExec, ServerApp, Ray) is stopped afterwards. This is what ``fedeid simulate`` uses.
* ``inprocess`` — :class:`fedeid.federated.inprocess.InProcessGrid`: sites answer one after the
  other inside this process. No Ray start-up or per-actor memory: used for sweeps and tests.

Either way the server's folder (``metrics.json``, ``checkpoints/``, ``global.pt``) and each site's
folder (``sites/site-<i>/reid.pt``) end up under ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from fedeid.config import Config
from fedeid.federated.runconfig import config_from_run, run_config_for, run_options

log = logging.getLogger("fedeid.federated")

ENGINES = ("flwr", "inprocess")


def project_dir() -> Path | None:
    """The Flower app folder (pyproject.toml with [tool.flwr.app]) this fedeid runs from, if any."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and "[tool.flwr.app" in pyproject.read_text() and (root / "client" / "app.py").is_file():
        return root
    return None


def simulate(cfg: Config, out_dir: str | Path, *, engine: str = "flwr", resume: bool = False,
             n_sites: int | None = None, timeout: float = 3600.0, drop: Any = None,
             evaluate: bool = True) -> dict[str, Any]:
    """Train ``cfg`` federatedly over ``n_sites`` (default ``cfg.data.n_sites``) synthetic sites.

    Returns the server's ``metrics.json`` content plus ``paths``. ``drop`` (in-process engine
    only) makes sites vanish mid-round, see :class:`~fedeid.federated.inprocess.InProcessGrid`.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    n = int(n_sites or cfg.data.n_sites)
    out = Path(out_dir).resolve()
    fed_dir = out / "federation"
    run_config = run_config_for(cfg, out_dir=fed_dir, state_dir=fed_dir / "sites", resume=resume, threads=1,
                                evaluate=evaluate)
    t0 = time.perf_counter()
    if engine == "flwr" and project_dir() is None:
        log.warning("fedeid is not running from its project folder: using the in-process engine")
        engine = "inprocess"
    peak_rss = None
    if engine == "inprocess":
        _run_inprocess(run_config, n, drop)
    else:
        peak_rss = _run_flwr(run_config, n, out / "flower", timeout)
    wall = time.perf_counter() - t0
    metrics = json.loads((fed_dir / "metrics.json").read_text())
    metrics["paths"] = {"federation": str(fed_dir), "global": str(fed_dir / "global.pt"),
                        "site_reid": [str(fed_dir / "sites" / f"site-{i}" / "reid.pt") for i in range(n)]}
    metrics["engine"] = engine
    metrics["cpu_slots"] = min(n, os.cpu_count() or 1) if engine == "flwr" else 1
    metrics["wall_seconds"] = wall
    if peak_rss is not None:
        metrics["peak_rss_bytes"] = peak_rss  # SuperLink + ServerApp + Ray workers, sampled every 0.5 s
    return metrics


def _run_inprocess(run_config: dict[str, Any], n: int, drop: Any) -> None:
    from client.app import app as client_app
    from fedeid.federated.inprocess import InProcessGrid
    from fedeid.federated.server import run_federation

    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": n} for i in range(n)], run_config,
                         drop=drop)
    run_federation(grid, config_from_run(run_config), run_options(run_config))


def _run_flwr(run_config: dict[str, Any], n: int, workdir: Path, timeout: float) -> int:
    from fedeid.federated.deploy import Deployment

    app = project_dir()
    assert app is not None
    workdir.mkdir(parents=True, exist_ok=True)
    with Deployment(workdir, simulation=True, connection="fedeid-sim") as dep:
        dep.start_superlink()
        result = dep.run(app, run_config=run_config, timeout=timeout,
                         federation_config={"num-supernodes": n, "client-resources-num-cpus": 1})
        (workdir / "flwr-run.log").write_text(result.stdout)
        peak = dep.peak_rss
    fed_dir = Path(str(run_config["fedeid.out-dir"]))
    if not (fed_dir / "global.pt").exists():
        tail = (workdir / "flwr-run.log").read_text()[-3000:]
        raise RuntimeError(f"the Flower run ended without a global model; log tail:\n{tail}")
    return peak
