"""Self-describing checkpoints: weights plus everything needed to rebuild and trust them.

A checkpoint is a ``torch.save``'d dict of plain data and tensors (loadable with
``weights_only=True``, so opening one never runs code): the full :class:`~fedeid.config.Config`,
package versions, image size, level range, modalities, finding names, the shared
decoupler/decoder state and, for a site's own use, the ReID state. The server's global
checkpoint has no ReID state: that network never leaves a site.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from fedeid import __version__
from fedeid.config import METHODS, Config
from fedeid.io import InputError, atomic_save

FORMAT = "fedeid-checkpoint"
FORMAT_VERSION = 1
DEFAULT_MODALITIES = ("CR", "DX")  # the synthetic benchmark and ChestX-ray14 are chest radiographs


def save_checkpoint(path: str | Path, cfg: Config, *, shared: dict[str, torch.Tensor] | None = None,
                    reid: dict[str, torch.Tensor] | None = None,
                    modalities: tuple[str, ...] = DEFAULT_MODALITIES,
                    extra: dict[str, Any] | None = None, method: str = "blocking") -> None:
    """Write atomically; ``shared`` = the method's trained shared state, ``reid`` = a site's ReID state."""
    from fedeid.models.deid_model import cfg_findings

    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "config": cfg.to_dict(),
        "versions": {"fedeid": __version__, "torch": str(torch.__version__), "python": platform.python_version()},
        "image_size": cfg.data.image_size,
        "level_range": [cfg.train.level_min, cfg.train.level_max],
        "modalities": list(modalities),
        "finding_names": list(cfg_findings(cfg)),
        "shared_state": {k: v.detach().cpu() for k, v in (shared or {}).items()},
        "reid_state": {k: v.detach().cpu() for k, v in reid.items()} if reid is not None else None,
        "extra": extra or {},
    }
    atomic_save(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate; a missing, corrupt or foreign file raises InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise InputError(path, f"not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(path, "not a fedeid checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise InputError(path, f"checkpoint format {payload.get('format_version')} is not supported "
                               f"(this fedeid reads {FORMAT_VERSION})")
    payload.setdefault("method", "blocking")  # written before method B existed
    if payload["method"] not in METHODS:
        raise InputError(path, f"checkpoint method {payload['method']!r} is not one of {', '.join(METHODS)}")
    try:
        payload["config_obj"] = Config.from_dict(payload["config"])
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"checkpoint config is invalid: {exc}") from exc
    return payload
