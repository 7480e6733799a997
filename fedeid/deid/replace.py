"""Method B's de-identifier: replace the identity with a synthetic one, or change a finding.

:class:`ReplaceDeIdentifier` has the same surface as :class:`fedeid.deid.pipeline.DeIdentifier`
(``deidentify``, ``deidentify_native``, ``save``; ``DeIdentifier.load`` returns one for a
method-B checkpoint), so the CLI, the DICOM pixel path and the evaluator use either.

**Strength** (the ``level`` argument): the identity vector is moved that far from the image's own
towards a synthetic identity drawn from the site's prior (0 = own, 1 = synthetic, normalised
linear interpolation on the unit sphere). Everything else moves with it, as method A's code
bottleneck does: each finding logit towards its decision (``+-CF_LOGIT``, by its sign), and the
free medical dimensions and the residual towards a fresh draw from the site's Gaussian
(:class:`fedeid.models.identity_prior.ResidualPrior`). At strength 1 a release therefore
depends on the patient only through the findings' decisions. (Measured on one network, 90
held-out patients, two draws each: with those vectors copied, the model holder linked 15-19 of
180 queries at strength 1; moved, 8-10, the suite's floor there being 4-5.) Every pixel of a
de-identified image comes from the generator, so nothing of the original can be matched patch
for patch; but it is rebuilt at the model's size, so a native-resolution output is the
generation upsampled. Strength 0 returns the input unchanged (nothing is generated), like level
0 of every other method; any strength above 0 is the generated image.

**Counterfactuals**: the same identity and residual, one finding's logit in the medical vector
set to ``+-CF_LOGIT``. The change is transferred as a difference (generation with the new
finding minus the generation with the old), added to the original, so what did not change keeps
the original's pixels and resolution.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedeid.checkpoint import DEFAULT_MODALITIES, save_checkpoint
from fedeid.config import Config
from fedeid.deid.native import deidentify_natives
from fedeid.imaging import resize, resize_array
from fedeid.io import InputError
from fedeid.models.deid_model import cfg_findings
from fedeid.models.identity_prior import IdentityPrior
from fedeid.models.replace import ReplaceModel, Vectors, load_replace_state, replace_state, toward
from fedeid.data.imageset import ImageSet
from fedeid.models.reid import ReIDNet
from fedeid.train import as_tensor, resolve_device, train_reid
from fedeid.train_replace import CF_LOGIT, fit_identity_prior, train_replace, training_summary


def parse_findings(items: list[str], names: tuple[str, ...]) -> dict[str, int]:
    """``["cardiomegaly=0", ...]`` -> ``{"cardiomegaly": 0}``; unknown names or values are a ValueError."""
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or value.strip() not in ("0", "1"):
            raise ValueError(f"--set-finding expects NAME=0 or NAME=1, got {item!r}")
        if name not in names:
            raise ValueError(f"unknown finding {name!r}; this model knows {', '.join(names)}")
        out[name] = int(value)
    if not out:
        raise ValueError("no finding to set")
    return out


class ReplaceDeIdentifier:
    method = "replace"

    def __init__(self, model: ReplaceModel, prior: IdentityPrior, cfg: Config, device: str | torch.device = "auto",
                 modalities: tuple[str, ...] = DEFAULT_MODALITIES, info: dict[str, Any] | None = None) -> None:
        if prior.dim != cfg.model.reid_dim:
            raise ValueError(f"identity prior has dimension {prior.dim}, the model {cfg.model.reid_dim}")
        self.cfg = cfg
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.prior = prior
        self.image_size = cfg.data.image_size
        self.level_range = (0.0, 1.0)
        self.modalities = tuple(modalities)
        self.findings = cfg_findings(cfg)
        self.info = dict(info or {})

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], path: str | Path, device: str = "auto",
                        prior: str | Path | None = None) -> ReplaceDeIdentifier:
        """From a loaded method-B checkpoint (:func:`fedeid.checkpoint.load_checkpoint`).

        ``prior`` names a site's identity-prior file (:func:`save_site_prior`): what a global
        federated model needs, as method A's needs the site's ReID network. It must have been
        fitted to exactly these weights (its identity vectors live in this encoder's space).
        """
        cfg: Config = ckpt["config_obj"]
        extra = ckpt.get("extra") or {}
        prior_state, prior_path = extra.get("identity_prior"), path
        if prior is not None:
            prior_state, prior_path = load_site_prior(prior, ckpt["shared_state"], path), prior
        if prior_state is None:
            raise InputError(path, "method-B checkpoint holds no identity prior (a global federated model: the "
                                   "prior never leaves its site); pass the site's prior too (--prior "
                                   f"<site state>/{PRIOR})")
        model = ReplaceModel(cfg)
        try:
            load_replace_state(model, ckpt["shared_state"])
        except (ValueError, RuntimeError) as exc:
            raise InputError(path, f"weights do not fit the stored config: {exc}") from exc
        try:
            prior_obj = IdentityPrior.from_state(prior_state, cfg.model.reid_dim, model.residual_dim)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise InputError(prior_path, f"identity prior does not fit the model: {exc}") from exc
        info = {k: v for k, v in extra.items() if k != "identity_prior"}
        return cls(model, prior_obj, cfg, device, tuple(ckpt["modalities"]), info)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """A site's self-describing checkpoint: heads + generator, the prior's bank and its calibration."""
        payload = {**self.info, **(extra or {}), "identity_prior": self.prior.state()}
        save_checkpoint(path, self.cfg, shared=replace_state(self.model), modalities=self.modalities,
                        extra=payload, method=self.method)

    def _images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images [N, {self.image_size}, {self.image_size}], got {images.shape}")
        return images

    @torch.no_grad()
    def replace_tensor(self, x: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
        """[B, 1, S, S] -> the same images with their identity moved ``level`` of the way to synthetic ones."""
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"level must lie in [0, 1], got {level}")
        x = x.to(self.device)
        if level == 0:
            return x.clone()
        v = self.model.vectors(x)
        keep = 1.0 - level
        synthetic = self.prior.draw(len(x), generator).to(self.device)
        logits = self.model.finding_logits(v)
        decided = keep * logits + level * CF_LOGIT * torch.sign(logits)
        residual = self.prior.residual.move(self.model.residual(v), keep, generator)
        return self.model.generate_from(toward(v.identity, synthetic, level), decided, residual).clamp(0, 1)

    def deidentify(self, images: np.ndarray, level: float, batch_size: int = 16, compensate: bool = True,
                   seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """images [N, S, S] in [0, 1] -> (de-identified [N, S, S], mask of generated pixels).

        Each image draws its own synthetic identity (fresh OS entropy unless ``seed`` fixes the
        draws, as the evaluation does), so two images of one patient are not linked by it.
        ``compensate`` exists for signature parity with method A and must be True.
        """
        if not compensate:
            raise ValueError("method B has no blocking-without-compensation variant")
        images = self._images(images)
        gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))
        x_all = as_tensor(images)
        outs = [self.replace_tensor(x_all[i:i + batch_size], level, gen).cpu() for i in range(0, len(x_all), batch_size)]
        out = torch.cat(outs)[:, 0].numpy().astype(np.float32) if outs else images.astype(np.float32)
        return out, np.full(images.shape, level > 0, dtype=bool)

    def deidentify_native(self, image: np.ndarray, level: float,
                          seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One image [H, W] -> (de-identified [H, W], generated-pixel mask): the generation upsampled."""
        return next(deidentify_natives(self, [image], level, seed))

    def compose_native(self, native: np.ndarray, small: np.ndarray, out: np.ndarray, mask: np.ndarray,
                       level: float) -> tuple[np.ndarray, np.ndarray]:
        """The release at ``native``'s resolution (the interface method A's DICOM path calls): method
        B generates every pixel, so above level 0 it is the generation upsampled; level 0 returns
        the input exactly."""
        if level == 0:
            return np.asarray(native, dtype=np.float32).copy(), np.zeros(native.shape, dtype=bool)
        return resize_array(out, native.shape), np.ones(native.shape, dtype=bool)

    def counterfactual_vectors(self, v: Vectors, targets: dict[str, int]) -> Vectors:
        """The same identity and residual; each finding in ``targets`` gets the logit ``+-CF_LOGIT``."""
        medical = v.medical.clone()
        for name, value in targets.items():
            medical[:, self.findings.index(name)] = CF_LOGIT * (2 * value - 1)
        return Vectors(v.identity, medical, v.other)

    @torch.no_grad()
    def counterfactual_delta(self, x: torch.Tensor, targets: dict[str, int]) -> torch.Tensor:
        """[B, 1, S, S] -> generation with the findings set minus generation as encoded (same identity)."""
        v = self.model.vectors(x.to(self.device))
        cf = self.counterfactual_vectors(v, targets)
        return self.model.generate(cf.identity, cf.medical, cf.other) - self.model.generate(v.identity, v.medical, v.other)

    def counterfactual(self, images: np.ndarray, targets: dict[str, int], batch_size: int = 16) -> np.ndarray:
        """images [N, S, S] -> the same patients with ``targets`` ({finding: 0 or 1}) set."""
        images = self._images(images)
        x_all = as_tensor(images)
        deltas = [self.counterfactual_delta(x_all[i:i + batch_size], targets).cpu()
                  for i in range(0, len(x_all), batch_size)]
        if not deltas:
            return images.astype(np.float32)
        return (images + torch.cat(deltas)[:, 0].numpy()).clip(0, 1).astype(np.float32)

    def counterfactual_native(self, image: np.ndarray, targets: dict[str, int]) -> np.ndarray:
        """One image [H, W] at its own resolution: the model-size change upsampled and added to it."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 2:
            raise ValueError(f"expected one grey image [H, W], got shape {image.shape}")
        delta = self.counterfactual_delta(as_tensor(resize_array(image, self.image_size)[None]), targets)
        return (image + resize(delta.cpu(), image.shape)[0, 0].numpy()).clip(0, 1).astype(np.float32)


def replace_method(deidentifier: ReplaceDeIdentifier, seed: int) -> Callable[[np.ndarray, float], np.ndarray]:
    """The evaluator's ``Method`` (images, strength) -> images, with reproducible draws.

    Each call takes the next seed of one stream seeded once. One seed for every call made the
    model holder's de-identification of the archive replay the releases' draws: image ``i`` of
    both calls got the same synthetic identity and residual draw, whoever the patients were.
    """
    seeds = np.random.default_rng(seed)
    return lambda images, level: deidentifier.deidentify(images, level, seed=int(seeds.integers(2**62)))[0]


def with_site_prior(model: ReplaceModel, data: ImageSet, cfg: Config, metrics: dict[str, float], *,
                    device: str = "auto") -> tuple[ReplaceDeIdentifier, dict[str, Any]]:
    """A trained model made a de-identifier with the prior fitted to its identity vectors of ``data``
    (a site's own images): after central training, and at a site holding a federated global model."""
    prior = fit_identity_prior(model, data, cfg)
    summary = training_summary(metrics, prior)
    return ReplaceDeIdentifier(model, prior, cfg, device, info=summary), summary


def train_replace_deidentifier(data: ImageSet, cfg: Config, reid: ReIDNet | None = None, *, progress: bool = False,
                               device: str = "auto") -> tuple[ReplaceDeIdentifier, dict[str, Any]]:
    """Central training of method B on ``data``: the site ReID network (unless given), heads +
    generator, then the identity prior fitted to the trained encoder's identity vectors of ``data``."""
    if reid is None:
        reid = train_reid(data, cfg, progress=progress)
    model = ReplaceModel(cfg)
    metrics = train_replace(model, reid, data, cfg, cfg.replace.epochs, progress=progress)
    return with_site_prior(model, data, cfg, metrics, device=device)


PRIOR = "identity_prior.pt"  # a site's prior for the federated global model, in its state folder


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of named weights (names, dtypes, shapes, values): which model a site prior belongs to."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def save_site_prior(path: str | Path, deidentifier: ReplaceDeIdentifier, **about: Any) -> None:
    """A site's identity prior alone (no weights), bound by their digest to the weights it was fitted
    to; ``about`` (plain values: what it was fitted on) is recorded beside it."""
    payload = {"identity_prior": deidentifier.prior.state(),
               "site_prior": {"model_sha256": weights_sha256(replace_state(deidentifier.model)), **about}}
    save_checkpoint(path, deidentifier.cfg, modalities=deidentifier.modalities, extra=payload, method="replace")


def load_site_prior(path: str | Path, shared: dict[str, torch.Tensor], model_path: str | Path) -> Any:
    """The prior state in a site-prior file, refused unless it was fitted to the weights ``shared``."""
    from fedeid.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    extra = ckpt.get("extra") or {}
    if ckpt["method"] != "replace" or "identity_prior" not in extra:
        raise InputError(path, "holds no method-B identity prior")
    fitted_to = (extra.get("site_prior") or {}).get("model_sha256")
    if fitted_to is None and ckpt["shared_state"]:  # a whole method-B checkpoint: its prior fits its own weights
        fitted_to = weights_sha256(ckpt["shared_state"])
    if fitted_to != weights_sha256(shared):
        raise InputError(path, f"identity prior was fitted to other weights than {model_path}'s (identity "
                               "vectors of another encoder live in another space); refit it on this model")
    return extra["identity_prior"]
