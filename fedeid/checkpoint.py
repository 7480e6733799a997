"""Self-describing checkpoints: weights plus everything needed to rebuild and trust them.

A checkpoint is a ``torch.save``'d dict of plain data and tensors (loadable with
``weights_only=True``, so opening one never runs code): the full :class:`~fedeid.config.Config`,
package versions, image size, level range, modalities, finding names, the shared
decoupler/decoder state and, for a site's own use, the ReID state. The server's global
checkpoint has no ReID state: that network never leaves a site.
"""

from __future__ import annotations

import pickle
import platform
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from fedeid import __version__
from fedeid.config import METHODS, Config
from fedeid.io import InputError, atomic_save

FORMAT = "fedeid-checkpoint"
# 2: full-resolution resize-convolution decoder, visible re-rendering, site ReID state carries the
# cohort's patch matchability. A format-1 file cannot be converted: its decoder has another shape.
# 3: the decoder renders from the level-tied released code (DeIdModel.release_code); a format-2
# decoder has the same shapes but was never trained on noised codes, so it is refused, not loaded.
# 4: the visible low-pass grows as sqrt(level) (DeIdModel.visible_sigma) and the texture noise's
# energy is weighted by 1 - level; a format-3 decoder was trained and calibrated without either,
# so its stored level calibration would not hold. Masks drawn per release (model.mask_temperature)
# need no new format: a config without the key loads with the default temperature, and a
# calibration measured with deterministic masks overstates the risk of the random ones.
FORMAT_VERSION = 4
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
    """Read and validate; a missing, corrupt, foreign or non-finite file raises InputError naming it.

    Only plain data and tensors are unpickled (``weights_only``), so a hostile file cannot run
    code; a file that needs more is refused as such, never with advice to load it unsafely.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder, not a checkpoint file")
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise InputError(path, "not a readable checkpoint (not a PyTorch archive: empty, truncated or another format)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of foreign files
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(path, "not a fedeid checkpoint (it holds objects other than plain data and tensors; "
                               "refused, as loading them could run code)") from exc
    except Exception as exc:  # torch raises many types for a bad file
        first = (str(exc).splitlines() or [""])[0][:160]
        raise InputError(path, f"not a readable checkpoint ({type(exc).__name__}: {first})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(path, "not a fedeid checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        older = isinstance(version, int) and version < FORMAT_VERSION
        hint = (": it predates the sqrt(level) visible low-pass (format 4; format 3 added the level-tied "
                "medical-code bottleneck, format 2 the re-rendering decoder and the matchability-aware "
                "blocking); retrain it with this fedeid"
                if older else "")
        raise InputError(path, f"checkpoint format {version} is not supported "
                               f"(this fedeid reads {FORMAT_VERSION}){hint}")
    payload.setdefault("method", "blocking")  # written before method B existed
    if payload["method"] not in METHODS:
        raise InputError(path, f"checkpoint method {payload['method']!r} is not one of {', '.join(METHODS)}")
    try:
        payload["config_obj"] = Config.from_dict(payload["config"])
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"checkpoint config is invalid: {exc}") from exc
    for part in ("shared_state", "reid_state"):
        check_weights(path, part, payload.get(part))
    return payload


def add_extra(path: str | Path, **entries: Any) -> None:
    """Store ``entries`` in a checkpoint's ``extra`` (e.g. the calibration an evaluation measured),
    leaving its weights and everything else as they are; rewritten atomically."""
    payload = load_checkpoint(path)
    payload.pop("config_obj")
    payload["extra"] = {**payload.get("extra", {}), **entries}
    atomic_save(path, lambda fh: torch.save(payload, fh))


def check_weights(path: Path, part: str, state: Any) -> None:
    """Refuse weights that are not a dict of tensors, or hold NaN/Inf: a model trained into
    divergence (or a tampered file) would otherwise de-identify into garbage without a word."""
    if state is None and part == "reid_state":
        return
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(path, f"not a fedeid checkpoint ({part} is not a set of named tensors)")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise InputError(path, f"weights hold NaN or Inf values ({part}: {bad[0]}{more}); the model is unusable")
