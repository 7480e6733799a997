"""Flower run config <-> the one :class:`~fedeid.config.Config`.

``[tool.flwr.app.config]`` in pyproject.toml lists the keys a run may override: the dotted
Config keys (``"fed.rounds"``, ``"privacy.mode"``, ...; ``""`` = the preset's value) and a few
``fedeid.*`` run options that are not part of the model's configuration:

* ``fedeid.preset`` — starting point (``quick``, ``full``, ``test``);
* ``fedeid.config-json`` — a whole Config as JSON (what ``fedeid simulate`` sends, so a
  simulation runs exactly the configuration it evaluates); applied after the preset;
* ``fedeid.out-dir`` — the server's folder: per-round ``metrics.json``, ``checkpoints/``,
  ``global.pt`` (relative paths are taken from the ServerApp's working directory);
* ``fedeid.resume`` — continue from the last round checkpoint in ``fedeid.out-dir``;
* ``fedeid.force-resume`` — resume even though the privacy settings (mode, noise multiplier,
  clipping norm, delta) differ from the checkpoint's; the ε already spent is kept either way;
* ``fedeid.wait-timeout`` — seconds to wait for ``fed.min-clients`` sites to be connected
  before a round; then the ServerApp gives up with a clear error instead of waiting forever;
* ``fedeid.round-timeout`` — seconds to wait for a round's replies (late sites are dropped);
* ``fedeid.min-replies`` — fewest valid replies a round needs to be aggregated;
* ``fedeid.state-dir`` — where simulated sites keep their ReID network and DP accountant
  (``<state-dir>/site-<id>``; empty: ``<out-dir>/sites/site-<id>``); a real SuperNode sets
  ``state-dir`` in its node config instead;
* ``fedeid.evaluate`` — run the clients' evaluate step after each round;
* ``fedeid.eval-level`` — the privacy level of the clients' local privacy/utility figures;
* ``fedeid.threads`` — torch threads per ClientApp (1: several sites share a small machine).

Server and clients call :func:`config_from_run` on the same run config, so they agree.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedeid.config import Config, preset

RUN_DEFAULTS: dict[str, Any] = {
    "fedeid.preset": "quick",
    "fedeid.config-json": "",
    "fedeid.out-dir": "runs/federated",
    "fedeid.resume": False,
    "fedeid.round-timeout": 3600.0,
    "fedeid.min-replies": 1,
    "fedeid.state-dir": "",
    "fedeid.evaluate": True,
    "fedeid.eval-level": 0.5,
    "fedeid.threads": 1,
    "fedeid.force-resume": False,
    "fedeid.wait-timeout": 600.0,
}


def config_from_run(run_config: dict[str, Any]) -> Config:
    """preset -> config-json -> every non-empty dotted Config key of the run config."""
    cfg = preset(str(run_config.get("fedeid.preset", RUN_DEFAULTS["fedeid.preset"]) or "quick"))
    raw = str(run_config.get("fedeid.config-json", "") or "")
    if raw:
        cfg = Config.from_dict(json.loads(raw))
    overrides = {k: v for k, v in run_config.items() if not k.startswith("fedeid.") and v != ""}
    cfg.override(overrides)
    return cfg


@dataclass
class RunOptions:
    out_dir: Path
    resume: bool = False
    round_timeout: float = 3600.0
    min_replies: int = 1
    state_dir: str = ""
    evaluate: bool = True
    eval_level: float = 0.5
    threads: int = 1
    force_resume: bool = False
    wait_timeout: float = 600.0


def _bool(v: Any) -> bool:
    return v.lower() in {"1", "true", "yes", "on"} if isinstance(v, str) else bool(v)


def run_options(run_config: dict[str, Any]) -> RunOptions:
    g = {**RUN_DEFAULTS, **{k: v for k, v in run_config.items() if k.startswith("fedeid.")}}
    out = Path(str(g["fedeid.out-dir"]) or RUN_DEFAULTS["fedeid.out-dir"]).expanduser()
    return RunOptions(out_dir=out.resolve(), resume=_bool(g["fedeid.resume"]),
                      round_timeout=float(g["fedeid.round-timeout"]), min_replies=int(g["fedeid.min-replies"]),
                      state_dir=str(g["fedeid.state-dir"] or ""), evaluate=_bool(g["fedeid.evaluate"]),
                      eval_level=float(g["fedeid.eval-level"]), threads=max(1, int(g["fedeid.threads"])),
                      force_resume=_bool(g["fedeid.force-resume"]), wait_timeout=float(g["fedeid.wait-timeout"]))


def run_config_for(cfg: Config, **options: Any) -> dict[str, Any]:
    """The run config that makes server and clients run exactly ``cfg`` (plus ``fedeid.*`` options).

    ``out_dir="x"`` -> ``"fedeid.out-dir": "x"`` etc.
    """
    rc: dict[str, Any] = {"fedeid.config-json": json.dumps(cfg.to_dict(), separators=(",", ":"))}
    for k, v in options.items():
        key = "fedeid." + k.replace("_", "-")
        if key not in RUN_DEFAULTS:
            raise KeyError(f"unknown run option {k!r}; known: {sorted(RUN_DEFAULTS)}")
        rc[key] = str(v) if isinstance(v, Path) else v
    return rc


def config_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key of Config (``section.field``), hyphenated as in pyproject's run config."""
    cfg = cfg or Config()
    keys = []
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            keys.append(f"{section.name}.{f.name.replace('_', '-')}")
    return keys
