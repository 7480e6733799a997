"""The server's folder: per-round metrics, a checkpoint after every round, resume, the final model.

::

    <out>/metrics.json              every finished round (written after each round, atomically)
    <out>/checkpoints/round-007.pt  the global decoupler+decoder after round 7 (+ DP accountant)
    <out>/state.json                {"round": 7, "checkpoint": "checkpoints/round-007.pt"}
    <out>/global.pt                 the final global model (a fedeid checkpoint, no ReID)

Order of writes after a round: checkpoint, metrics, then the ``state.json`` pointer — each
atomic — so a server killed at any moment resumes from a consistent last round.
``global.pt`` is loadable by :meth:`fedeid.deid.pipeline.DeIdentifier.load` together with a
site's ReID checkpoint (``DeIdentifier.load("global.pt", reid="site-0/reid.pt")``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedeid.checkpoint import load_checkpoint, save_checkpoint
from fedeid.config import Config
from fedeid.io import InputError, atomic_write_json


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples -> lists, numpy scalars -> floats (what weights_only loading accepts)."""
    from fedeid.io import _json_default

    return json.loads(json.dumps(obj, default=_json_default))


class RunDir:
    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)
        self.metrics_path = self.root / "metrics.json"
        self.state_path = self.root / "state.json"
        self.global_path = self.root / "global.pt"
        self.ckpt_dir = self.root / "checkpoints"

    def round_path(self, server_round: int) -> Path:
        return self.ckpt_dir / f"round-{server_round:03d}.pt"

    def save_round(self, cfg: Config, server_round: int, state: dict[str, torch.Tensor],
                   history: list[dict[str, Any]], accountant: dict[str, Any] | None,
                   summary: dict[str, Any] | None = None) -> Path:
        path = self.round_path(server_round)
        save_checkpoint(path, cfg, shared=state, extra={"federated": _plain({
            "round": server_round, "rounds": cfg.fed.rounds, "central_dp": accountant})})
        self.write_metrics(cfg, history, summary)
        atomic_write_json(self.state_path, {"round": server_round, "checkpoint": str(path.relative_to(self.root))})
        return path

    def write_metrics(self, cfg: Config, history: list[dict[str, Any]], summary: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.metrics_path, {"config": cfg.to_dict(), "rounds": history, "summary": summary or {}})

    def last(self) -> dict[str, Any] | None:
        """The last finished round (checkpoint payload, round number, history up to it), or None."""
        if not self.state_path.exists():
            return None
        try:
            pointer = json.loads(self.state_path.read_text())
            ckpt_path = self.root / pointer["checkpoint"]
            server_round = int(pointer["round"])
        except (ValueError, KeyError, OSError) as exc:
            raise InputError(self.state_path, f"unreadable resume pointer: {exc}") from exc
        ckpt = load_checkpoint(ckpt_path)
        history: list[dict[str, Any]] = []
        if self.metrics_path.exists():
            try:
                history = [r for r in json.loads(self.metrics_path.read_text()).get("rounds", [])
                           if int(r.get("round", 0)) <= server_round]
            except ValueError as exc:
                raise InputError(self.metrics_path, f"unreadable metrics: {exc}") from exc
        fed = ckpt["extra"].get("federated", {})
        return {"round": server_round, "checkpoint": ckpt, "path": ckpt_path, "history": history,
                "central_dp": fed.get("central_dp")}

    def save_final(self, cfg: Config, state: dict[str, torch.Tensor], extra: dict[str, Any]) -> Path:
        save_checkpoint(self.global_path, cfg, shared=state, extra={"federated": _plain(extra)})
        return self.global_path


def check_resumable(saved: Config, current: Config, path: Path) -> None:
    """Resuming must not change the networks or the data; rounds/epochs/DP settings may change."""
    for section in ("model", "data"):
        if getattr(saved, section) != getattr(current, section):
            raise InputError(path, f"cannot resume: the {section} configuration differs from the checkpoint's")
