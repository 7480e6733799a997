"""The server's folder: per-round metrics, a checkpoint after every round, resume, the final model.

::

    <out>/metrics.json              every finished round (written after each round, atomically)
    <out>/checkpoints/round-007.pt  the global decoupler+decoder after round 7 (+ DP accountant)
    <out>/state.json                {"round": 7, "checkpoint": "checkpoints/round-007.pt"}
    <out>/global.pt                 the final global model (a fedeid checkpoint, no ReID)

    <out>/.lock                     held (flock) by the one ServerApp writing this folder

A round is saved right after aggregation — checkpoint with the central-DP accountant, metrics,
then the ``state.json`` pointer, each atomic — and *before* its model is sent to anyone (the
clients' evaluate step, the next round): a server killed at any moment resumes from a
consistent last round, and no released model is missing from the accountant.

Only one ServerApp may write a folder: :func:`exclusive` takes an ``fcntl.flock`` on
``<out>/.lock`` for the ServerApp's life; a second one fails at once. The kernel drops the lock
when its process dies, so a crashed server never leaves a stale lock behind.
``global.pt`` is loadable by :meth:`fedeid.deid.pipeline.DeIdentifier.load` together with the
site's own part: its ReID checkpoint for method A (``DeIdentifier.load("global.pt",
reid="site-0/reid.pt")``), its identity prior for method B (``prior="site-0/identity_prior.pt"``).
Checkpoints record the method (``fed.method``) they hold.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fedeid.checkpoint import load_checkpoint, save_checkpoint
from fedeid.config import Config
from fedeid.io import InputError, atomic_write_json

log = logging.getLogger("fedeid.federated")


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
        save_checkpoint(path, cfg, shared=state, method=cfg.fed.method, extra={"federated": _plain({
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
        save_checkpoint(self.global_path, cfg, shared=state, method=cfg.fed.method, extra={"federated": _plain(extra)})
        return self.global_path


PRIVACY_FIELDS = ("mode", "noise_multiplier", "clipping_norm", "delta")


def check_resumable(saved: Config, current: Config, path: Path, *, force: bool = False) -> None:
    """Resuming must not change the networks or the data; the privacy settings only when forced.

    A silently changed noise multiplier (or mode, clipping norm, delta) would make the ε
    reported for the run describe a mechanism that was not the one applied. With ``force`` the
    change is allowed and logged; the ε already spent is kept by the caller either way.
    """
    if saved.fed.method != current.fed.method:
        raise InputError(path, f"cannot resume: the checkpoint holds a {saved.fed.method!r} model, this run "
                               f"trains {current.fed.method!r} (fed.method)")
    for section in ("model", "data") + (("replace",) if current.fed.method == "replace" else ()):
        if getattr(saved, section) != getattr(current, section):
            raise InputError(path, f"cannot resume: the {section} configuration differs from the checkpoint's")
    changed = [f"privacy.{k} {getattr(saved.privacy, k)!r} -> {getattr(current.privacy, k)!r}"
               for k in PRIVACY_FIELDS if getattr(saved.privacy, k) != getattr(current.privacy, k)]
    if changed and not force:
        raise InputError(path, "cannot resume: the privacy settings differ from the checkpoint's ("
                         + ", ".join(changed) + "); set fedeid.force-resume=true to resume anyway "
                         "(the ε already spent stays in the summary)")
    if changed:
        log.warning("forced resume with changed privacy settings: %s",
                                                      ", ".join(changed))


@contextmanager
def exclusive(root: Path) -> Iterator[Path]:
    """Hold ``<root>/.lock`` (``fcntl.flock``, non-blocking) for the ``with`` block, or fail at once."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise InputError(root, f"another ServerApp (pid {holder}) is writing this folder; "
                                   "stop it or use another fedeid.out-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
