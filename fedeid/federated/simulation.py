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
import threading
import time
from pathlib import Path
from typing import Any

from fedeid.config import Config
from fedeid.federated.runconfig import config_from_run, run_config_for, run_options
from fedeid.progress import Progress

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
    with RoundWatcher(fed_dir / "metrics.json", cfg.fed.rounds):
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


class RoundWatcher:
    """One console line per finished round while the federation runs.

    The ServerApp runs in another process under the Flower engine (its output is only in
    ``flwr-run.log`` afterwards), so minutes passed with nothing on the console. Both engines
    write ``metrics.json`` atomically after every round; a thread polling it serves both.
    """

    def __init__(self, metrics_path: Path, rounds: int, poll_seconds: float = 2.0) -> None:
        self.metrics_path = metrics_path
        self.rounds = rounds
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedeid-rounds", daemon=True)
        self._seen = 0

    def __enter__(self) -> RoundWatcher:
        self._seen = len(self._rounds())  # a resumed run's earlier rounds are not news
        self._progress = Progress(max(self.rounds - self._seen, 0), "federated", "round", every=0)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the last round, written just before the run returned
        self._progress.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self._poll()

    def _rounds(self) -> list[dict[str, Any]]:
        try:
            return list(json.loads(self.metrics_path.read_text()).get("rounds", []))
        except (OSError, ValueError):  # not written yet
            return []

    def _poll(self) -> None:
        rounds = self._rounds()
        for row in rounds[self._seen:]:
            self._progress.update(status=round_status(row))
        self._seen = max(self._seen, len(rounds))


def round_status(row: dict[str, Any]) -> str:
    """What a person watching wants of a round: who replied, who was rejected, the sites' mean
    reconstruction and finding losses, and ε."""
    parts = [f"round {row.get('round')}: {row.get('valid_replies', 0)}/{row.get('sampled')} valid replies"]
    if row.get("rejected"):
        parts.append(f"{len(row['rejected'])} rejected")
    metrics = row.get("train_metrics") or {}
    parts += [f"{name} {metrics[key]:.3f}" for key, name in (("rec", "reconstruction"), ("task", "finding loss"))
              if key in metrics]
    eps = (row.get("central_dp") or {}).get("epsilon")
    if eps is None:
        eps = (row.get("local_dp") or {}).get("epsilon_max")
    if eps is not None:
        parts.append(f"ε {eps:.2f}")
    return ", ".join(parts)


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
