"""MDL feature decoupling: MFM features -> (medical code, identity code).

The medical code is variational: its description length is the KL divergence of q(z|x) to the
standard normal prior, in nats (the rate term of Minimum Description Length). The code must
still explain the findings (a medical-task head on it), while a separate identity code is made
to carry the ReID signal, and an adversary behind a gradient-reversal layer tries to read the
identity from the medical code. Penalising rate leaves the medical code only what the findings
need; the adversary and a cross-correlation penalty drive identity into the other code.

Every term is computed per sample (no batch statistics), so per-sample DP-SGD (Opacus) clips
exactly one patient image's contribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def randn_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``t``; drawn on the CPU from ``generator`` when given, so
    a release seed gives the same noise on every device (a GPU generator draws other numbers)."""
    if generator is None:
        return torch.randn_like(t)
    return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return -grad


@dataclass
class Codes:
    medical: torch.Tensor  # [B, Cm, h, w]: what the decoder gets (a sample in training, the mean otherwise)
    mu: torch.Tensor
    logvar: torch.Tensor
    identity: torch.Tensor  # [B, Ci, h, w]: discarded at inference


class MDLDecoupler(nn.Module):
    def __init__(self, in_channels: int, medical_channels: int, identity_channels: int,
                 n_findings: int, reid_dim: int, hidden: int = 96, variational: bool = True) -> None:
        super().__init__()
        self.variational = variational
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True),
        )
        self.mu = nn.Conv2d(hidden, medical_channels, 1)
        self.logvar = nn.Conv2d(hidden, medical_channels, 1)
        self.identity = nn.Conv2d(hidden, identity_channels, 1)
        self.finding_head = nn.Linear(medical_channels, n_findings)
        self.identity_head = nn.Linear(identity_channels, reid_dim)
        self.adversary = nn.Sequential(nn.Linear(medical_channels, hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, reid_dim))

    def forward(self, feats: torch.Tensor, sample: bool = False,
                generator: torch.Generator | None = None) -> Codes:
        """``sample`` draws the medical code from q(z|x) (training, and every release: two
        releases of one image then differ); otherwise the code is the mean."""
        h = self.trunk(feats)
        mu = self.mu(h)
        logvar = self.logvar(h).clamp(-8.0, 8.0)
        medical = mu
        if sample and self.variational:
            medical = mu + randn_like(mu, generator) * torch.exp(0.5 * logvar)
        return Codes(medical=medical, mu=mu, logvar=logvar, identity=self.identity(h))

    def medical_mean(self, feats: torch.Tensor) -> torch.Tensor:
        """Only the medical code's mean: running heads whose output is unused would leave Opacus'
        per-sample gradient hooks with activations that no gradient ever reaches."""
        return self.mu(self.trunk(feats))

    def finding_logits(self, code: torch.Tensor) -> torch.Tensor:
        return self.finding_head(code.mean(dim=(2, 3)))

    def identity_embedding(self, codes: Codes) -> torch.Tensor:
        return F.normalize(self.identity_head(codes.identity.mean(dim=(2, 3))), dim=1)

    def adversary_embedding(self, codes: Codes) -> torch.Tensor:
        """The adversary's guess of the identity from the medical code, gradients reversed."""
        pooled = _GradReverse.apply(codes.medical.mean(dim=(2, 3)))
        return F.normalize(self.adversary(pooled), dim=1)


def rate_nats(codes: Codes) -> torch.Tensor:
    """Per-sample description length of the medical code: KL(q(z|x) || N(0, I)) in nats [B]."""
    kl = 0.5 * (codes.mu.pow(2) + codes.logvar.exp() - 1.0 - codes.logvar)
    return kl.flatten(1).sum(dim=1)


def cross_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample squared cross-correlation between two code maps over spatial positions [B].

    Zero when every medical channel is linearly uncorrelated with every identity channel across
    the image: the independence term, computed within each sample so it stays per-sample.
    """
    a = a.flatten(2)
    b = b.flatten(2)
    a = (a - a.mean(-1, keepdim=True)) / (a.std(-1, keepdim=True) + 1e-5)
    b = (b - b.mean(-1, keepdim=True)) / (b.std(-1, keepdim=True) + 1e-5)
    corr = a @ b.transpose(1, 2) / a.shape[-1]
    return corr.pow(2).mean(dim=(1, 2))
