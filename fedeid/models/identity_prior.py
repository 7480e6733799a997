"""Synthetic identities that provably belong to no patient of the site.

A Gaussian mixture (scikit-learn) is fitted to the site's identity vectors, so samples look like
identities (they lie where patients lie, not anywhere on the sphere). Each sample is then
checked against *every* identity vector of the site's images and rejected when its cosine to any
of them reaches the **margin**: the cosine that two images of *different* patients exceed at the
configured false-positive rate (``replace.prior_fpr``, 1e-3 by default), calibrated on the
site's own same- vs different-patient pairs. An accepted identity is therefore at least as far
from every real image of the site as 99.9 % of pairs of distinct patients are from each other.

Only the accepted samples (a bank) and the calibration figures are kept. The mixture itself is
discarded: its component means are averages of real identity vectors, and with few patients a
component can sit on one patient. The bank, by construction, holds no vector within the margin
of any real one, so it can be stored with the model at the site without storing identities.

The prior also holds a :class:`ResidualPrior`: a Gaussian over the site's *other* vectors (the
medical vector's free dimensions and the residual), from which method B draws them at full
strength, so that a release then depends on the patient only through its finding decisions.
It is a mean and a covariance over all the site's images, kept at the site like the bank.

Limits, plainly: the check is against the identity vectors of the images the site had when the
prior was fitted, in the encoder's identity space; a patient's unseen image may lie a little
elsewhere (``tpr_at_margin`` says how often two images of one patient exceed the margin), and an
attacker with another network sees other features — that is what the evaluation's attacker
suite measures. And the check is only as strong as the identity vectors are discriminative: if
they do not yet separate the site's patients (an undertrained encoder puts every patient at
cosine ~1), the margin sits at ~1 and excludes almost nothing; ``tpr_at_margin`` near 0 says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture

_TRIES = 50  # draws per wanted sample before giving up (a prior that rejects 98 % is useless)


@dataclass
class PriorReport:
    margin: float  # cosine: samples at or above it to any real identity are rejected
    fpr: float  # different-patient pairs above the margin, the rate it was calibrated at
    tpr_at_margin: float  # same-patient pairs above the margin (how well the margin matches)
    n_real: int  # identity vectors checked against
    n_patients: int
    n_components: int
    n_drawn: int
    n_rejected: int
    rejection_rate: float
    max_cos_accepted: float  # the closest any accepted sample came to a real identity


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)


_CALIBRATION_IMAGES = 3000  # pairs of at most this many images (4.5 M pairs) calibrate the margin


def calibrate_margin(vectors: np.ndarray, patient_ids: np.ndarray, fpr: float, seed: int = 0) -> tuple[float, float]:
    """(margin, TPR there): the cosine different patients exceed at rate ``fpr``, from the site's pairs.

    A large site is calibrated on a random subset of its images (all pairs of N images would need
    N^2 memory); the rejection check itself always runs against every image.
    """
    v = _unit(np.asarray(vectors, dtype=np.float64))
    ids = np.asarray(patient_ids)
    if len(v) > _CALIBRATION_IMAGES:
        keep = np.random.default_rng(seed).choice(len(v), _CALIBRATION_IMAGES, replace=False)
        v, ids = v[keep], ids[keep]
    iu = np.triu_indices(len(v), k=1)
    cos = (v @ v.T)[iu]
    same = ids[iu[0]] == ids[iu[1]]
    diff = cos[~same]
    if len(diff) == 0:
        raise ValueError("calibrating the identity margin needs images of at least two patients")
    margin = float(np.quantile(diff, 1.0 - fpr, method="higher"))
    tpr = float((cos[same] >= margin).mean()) if same.any() else float("nan")
    return margin, tpr


def closest_cosine(sample: np.ndarray, real: np.ndarray, block: int = 8192) -> np.ndarray:
    """For each unit ``sample`` row, its largest cosine to any ``real`` row (in blocks: memory stays flat)."""
    out = np.full(len(sample), -np.inf)
    for i in range(0, len(real), block):
        out = np.maximum(out, (sample @ real[i:i + block].T).max(axis=1))
    return out


class ResidualPrior:
    """A Gaussian over the site's non-identity, non-finding vectors; :meth:`move` draws towards it.

    Why: with only the identity replaced, method B's model holder still linked a patient's
    releases at full strength (15-19 of 180 queries on 90 held-out patients, 7.5-9.5 x chance)
    through what the release kept of the original: the free medical dimensions, the residual and
    the continuous finding logits.
    """

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        if mean.ndim != 1 or scale.shape != (len(mean), len(mean)):
            raise ValueError(f"residual prior needs a mean [R] and a scale [R, R], got {tuple(mean.shape)} "
                             f"and {tuple(scale.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(scale).all()):
            raise ValueError("residual prior holds NaN or Inf values")
        self.mean, self.scale = mean.float(), scale.float()

    @classmethod
    def fit(cls, vectors: np.ndarray) -> ResidualPrior:
        """Mean and Cholesky factor of the covariance (regularised) of ``vectors`` [N, R], N >= 2."""
        v = torch.as_tensor(np.asarray(vectors), dtype=torch.float64)
        if v.ndim != 2 or len(v) < 2:
            raise ValueError("fitting the residual prior needs at least two vectors [N, R]")
        cov = torch.cov(v.T).reshape(v.shape[1], v.shape[1])
        scale = torch.linalg.cholesky(cov + 1e-5 * torch.eye(v.shape[1], dtype=torch.float64))
        return cls(v.mean(0), scale)

    def move(self, own: torch.Tensor, keep: float, generator: torch.Generator) -> torch.Tensor:
        """``own`` [B, R] with its deviation from the mean scaled by ``keep`` and the variance made
        up by a fresh draw: ``keep`` 1 returns ``own``, 0 a draw that knows nothing of it."""
        noise = torch.randn(len(own), len(self.mean), generator=generator).to(own.device)
        mean, scale = self.mean.to(own.device), self.scale.to(own.device)
        return mean + keep * (own - mean) + (1 - keep ** 2) ** 0.5 * noise @ scale.T

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "scale": self.scale.clone()}

    @classmethod
    def from_state(cls, state: Any, dim: int) -> ResidualPrior:
        if not isinstance(state, dict) or not all(isinstance(state.get(k), torch.Tensor) for k in ("mean", "scale")):
            raise ValueError("the site prior holds no residual prior (fitted before method B drew the free "
                             "medical and residual vectors): retrain, or rerun the federation to refit it")
        prior = cls(state["mean"], state["scale"])
        if len(prior.mean) != dim:
            raise ValueError(f"residual prior has dimension {len(prior.mean)}, the model {dim}")
        return prior


class IdentityPrior:
    """A bank of synthetic identities (unit vectors) outside the margin of every real one, and the
    site's :class:`ResidualPrior`."""

    def __init__(self, bank: torch.Tensor, report: PriorReport, residual: ResidualPrior) -> None:
        if bank.ndim != 2 or len(bank) == 0 or not torch.isfinite(bank).all():
            raise ValueError("identity prior bank must be a finite, non-empty [K, D] matrix")
        if not torch.allclose(bank.double().norm(dim=1), torch.ones(len(bank), dtype=torch.float64), atol=1e-4):
            raise ValueError("identity prior bank must hold unit vectors")
        self.bank = bank.float()
        self.report = report
        self.residual = residual

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    @classmethod
    def fit(cls, vectors: np.ndarray, patient_ids: np.ndarray, *, residual: np.ndarray, components: int,
            fpr: float, bank_size: int, seed: int = 0) -> IdentityPrior:
        """Fit the mixture to the site's identity vectors, calibrate the margin, keep ``bank_size``
        accepted samples; fit the :class:`ResidualPrior` to the same images' ``residual`` vectors."""
        real = _unit(np.asarray(vectors, dtype=np.float64))
        margin, tpr = calibrate_margin(real, patient_ids, fpr, seed)
        n_patients = int(len(np.unique(patient_ids)))
        k = max(1, min(components, n_patients // 2, len(real) // 4))
        gmm = GaussianMixture(k, covariance_type="diag", reg_covar=1e-4, random_state=seed).fit(real)
        rng = np.random.default_rng(seed)
        accepted: list[np.ndarray] = []
        drawn = rejected = 0
        max_cos = -1.0
        while sum(len(a) for a in accepted) < bank_size:
            if drawn >= _TRIES * bank_size:
                raise ValueError(f"identity prior: {rejected} of {drawn} samples fell within the margin "
                                 f"{margin:.3f} of a real patient; the identity space is too crowded")
            n = max(256, bank_size)
            comp = rng.choice(k, size=n, p=gmm.weights_ / gmm.weights_.sum())
            means = gmm.means_[comp]
            raw = means + rng.standard_normal(means.shape) * np.sqrt(gmm.covariances_[comp])
            # checked exactly as stored: float32 unit vectors
            sample = F.normalize(torch.from_numpy(raw).float(), dim=1).double().numpy()
            closest = closest_cosine(sample, real)
            ok = closest < margin
            drawn += n
            rejected += int((~ok).sum())
            if ok.any():
                max_cos = max(max_cos, float(closest[ok].max()))
                accepted.append(sample[ok])
        bank = np.concatenate(accepted)[:bank_size]
        report = PriorReport(margin=margin, fpr=float(fpr), tpr_at_margin=tpr, n_real=len(real),
                             n_patients=n_patients, n_components=k, n_drawn=drawn, n_rejected=rejected,
                             rejection_rate=rejected / drawn, max_cos_accepted=max_cos)
        return cls(torch.from_numpy(bank).float(), report, ResidualPrior.fit(residual))

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` synthetic identities from the bank (uniformly, with replacement)."""
        idx = torch.randint(len(self.bank), (n,), generator=generator)
        return self.bank[idx]

    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint (tensors and floats only: loads with ``weights_only=True``)."""
        return {"bank": self.bank.clone(), "report": asdict(self.report), "residual": self.residual.state()}

    @classmethod
    def from_state(cls, state: dict[str, Any], dim: int, residual_dim: int) -> IdentityPrior:
        try:
            report = PriorReport(**state["report"])
            bank = state["bank"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"identity prior state is incomplete: {exc}") from exc
        if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or bank.shape[1] != dim:
            raise ValueError(f"identity prior bank must be [K, {dim}]")
        return cls(bank, report, ResidualPrior.from_state(state.get("residual"), residual_dim))
