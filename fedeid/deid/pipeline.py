"""The de-identifier: identity relevance -> patch blocking -> medical-semantics compensation.

:class:`DeIdentifier` is what every consumer uses (CLI, DICOM path, evaluation, federated
clients): it holds the frozen encoder, the trained decoupler + decoder, and the ReID network of
the site that runs it, and turns images at the model's size into de-identified images at a
privacy level.

Every release is random: the blocked patches, the medical code and the re-texturing noise are
drawn from a seed taken from ``os.urandom`` unless the caller passes one (tests, reproducible
examples). A fixed seed makes two releases of the same image linkable by anyone holding the
model; never fix it for data that leaves the site.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedeid.checkpoint import DEFAULT_MODALITIES, load_checkpoint, save_checkpoint
from fedeid.config import Config
from fedeid.deid.blocking import block_mask, gumbel_perturb, identity_relevance, patch_grid
from fedeid.deid.native import deidentify_natives
from fedeid.imaging import compose_native
from fedeid.io import InputError
from fedeid.models.deid_model import DeIdModel, cfg_findings, load_shared_state, shared_state
from fedeid.models.reid import ReIDNet
from fedeid.train import as_tensor, resolve_device


def build_site_reid(cfg: Config) -> ReIDNet:
    """An (untrained) site network of the configured shape: ReID embedding plus finding head."""
    patches = patch_grid(cfg.data.image_size, cfg.model.patch_size) ** 2
    return ReIDNet(cfg.model.reid_size, cfg.model.reid_dim, len(cfg_findings(cfg)), patches)


def reid_from_state(cfg: Config, state: dict[str, torch.Tensor]) -> ReIDNet:
    """A site's ReID network rebuilt from its state (a mismatch raises RuntimeError)."""
    net = build_site_reid(cfg)
    net.load_state_dict(state)
    return net.eval()


class DeIdentifier:
    def __init__(self, model: DeIdModel, reid: ReIDNet, cfg: Config, device: str | torch.device = "auto",
                 modalities: tuple[str, ...] = DEFAULT_MODALITIES, info: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.reid = reid.to(self.device).eval()
        self.image_size = cfg.data.image_size
        self.level_range = (cfg.train.level_min, cfg.train.level_max)
        self.modalities = tuple(modalities)
        # what the checkpoint stored beside the weights (training figures, the level calibration),
        # as method B's de-identifier keeps it: callers read it here instead of loading the file again
        self.info = dict(info or {})

    @classmethod
    def build(cls, cfg: Config, device: str = "auto") -> DeIdentifier:
        """Untrained networks over the real pipeline (tests, smoke runs)."""
        torch.manual_seed(cfg.train.seed)
        return cls(DeIdModel(cfg), build_site_reid(cfg), cfg, device)

    @classmethod
    def from_models(cls, model: DeIdModel, reid: ReIDNet, cfg: Config, device: str = "auto") -> DeIdentifier:
        return cls(model, reid, cfg, device)

    @classmethod
    def load(cls, path: str | Path, reid: str | Path | None = None, device: str = "auto",
             method: str | None = None, prior: str | Path | None = None) -> Any:
        """Rebuild from a checkpoint; ``reid`` names a site's ReID checkpoint when ``path`` has none.

        A method-B checkpoint (``method == "replace"``) gives a
        :class:`fedeid.deid.replace.ReplaceDeIdentifier` (same surface; it needs no ReID network);
        ``prior`` names the site's identity prior when ``path`` (a global federated model) has
        none. ``method``, when given, is what the caller expects the checkpoint to hold.
        """
        ckpt = load_checkpoint(path)
        if method is not None and ckpt["method"] != method:
            raise InputError(path, f"is a {ckpt['method']!r} checkpoint, not {method!r}")
        if ckpt["method"] == "replace":
            from fedeid.deid.replace import ReplaceDeIdentifier

            if reid is not None:
                raise InputError(reid, f"a ReID checkpoint goes with a method-A model; {path} is method B, "
                                       "whose site part is its identity prior (--prior)")
            return ReplaceDeIdentifier.from_checkpoint(ckpt, path, device, prior=prior)
        if prior is not None:
            raise InputError(prior, f"an identity prior goes with a method-B model; {path} is method A, "
                                    "whose site part is its ReID network (--reid)")
        cfg: Config = ckpt["config_obj"]
        reid_state = ckpt["reid_state"]
        if reid is not None:
            reid_state = load_checkpoint(reid)["reid_state"]
            if reid_state is None:
                raise InputError(reid, "checkpoint holds no ReID network")
        if reid_state is None:
            raise InputError(path, "checkpoint holds no ReID network (a global federated model): "
                                   "pass the site's ReID checkpoint too")
        model = DeIdModel(cfg)
        try:
            load_shared_state(model, ckpt["shared_state"])
            reid_net = reid_from_state(cfg, reid_state)
        except (ValueError, RuntimeError) as exc:
            raise InputError(path, f"weights do not fit the stored config: {exc}") from exc
        return cls(model, reid_net, cfg, device, tuple(ckpt["modalities"]), ckpt.get("extra"))

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        save_checkpoint(path, self.cfg, shared=shared_state(self.model), reid=self.reid.state_dict(),
                        modalities=self.modalities, extra=extra)

    def _check_level(self, level: float) -> None:
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"level must lie in [0, 1], got {level}")

    @staticmethod
    def release_generator(seed: int | None) -> torch.Generator:
        """The random source of one release: ``seed``, or 64 bits from the operating system."""
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        return torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def deidentify_tensor(self, x: torch.Tensor, level: float, compensate: bool = True,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 1, S, S] in [0, 1] on any device -> (de-identified, blocked mask) on this device.

        ``compensate=False`` is the "blocking without compensation" baseline: blocked patches
        get the image's mean intensity instead of synthesised content, visible ones stay as they are.
        """
        self._check_level(level)
        x = x.to(self.device)
        m = self.cfg.model
        generator = generator or self.release_generator(None)
        scores = identity_relevance(self.reid, x, self.image_size, m.patch_size, m.matchability_weight)
        scores = gumbel_perturb(scores, m.mask_temperature, generator)  # which patches: drawn per release
        mask = block_mask(scores, level, self.image_size, m.patch_size)
        if level == 0:
            return x.clone(), mask
        if compensate:
            out, _, _, _ = self.model(x, mask, level, sample=True, generator=generator)
        else:
            out = mask * x.mean(dim=(1, 2, 3), keepdim=True) + (1 - mask) * x
        return out.clamp(0, 1), mask

    def deidentify(self, images: np.ndarray, level: float, batch_size: int = 16, compensate: bool = True,
                   seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """images float32 [N, S, S] in [0, 1] -> (de-identified float32 [N, S, S], blocked mask bool).

        Outside the mask nothing is copied either (above level 0): the mask says what was
        synthesised, the rest was re-rendered from its low-pass.
        """
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images [N, {self.image_size}, {self.image_size}], got {images.shape}")
        self._check_level(level)
        generator = self.release_generator(seed)
        outs, masks = [], []
        x_all = as_tensor(images)
        for i in range(0, len(x_all), batch_size):
            out, mask = self.deidentify_tensor(x_all[i:i + batch_size], level, compensate, generator)
            outs.append(out.cpu())
            masks.append(mask.cpu())
        if not outs:
            return images.astype(np.float32), np.zeros(images.shape, dtype=bool)
        return (torch.cat(outs)[:, 0].numpy().astype(np.float32),
                torch.cat(masks)[:, 0].numpy() > 0.5)

    def deidentify_native(self, image: np.ndarray, level: float,
                          seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One image [H, W] in [0, 1] at its own resolution -> (de-identified [H, W], blocked mask [H, W])."""
        return next(deidentify_natives(self, [image], level, seed))

    def compose_native(self, native: np.ndarray, small: np.ndarray, out: np.ndarray, mask: np.ndarray,
                       level: float) -> tuple[np.ndarray, np.ndarray]:
        """A result at the model's size (``small`` in, ``out`` and ``mask`` from :meth:`deidentify`)
        -> the release at ``native``'s resolution, and the blocked mask there.

        The synthesis is upsampled and, outside the blocked patches, the native image low-passed
        at the level's strength (scaled to native pixels) supplies the detail the network's size
        cannot hold; no native pixel is copied above level 0. Level 0 returns the input exactly.
        """
        if level == 0:
            return np.asarray(native, dtype=np.float32).copy(), np.zeros(native.shape, dtype=bool)
        sigma = float(self.model.visible_sigma(level)[0])
        return compose_native(native, small, out, mask, sigma, self.cfg.model.feather)
