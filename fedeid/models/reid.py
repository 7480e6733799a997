"""Patient re-identification: the identity-saliency source and the privacy attacker.

Metric learning with a CosFace (large-margin cosine) loss over training patients: fast to train
on small sets and its normalised embeddings generalise to unseen patients, which is what both
uses need — the saliency network meets new patients at inference, the attacker matches
de-identified queries against a gallery.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedeid.models.backbone import ConvNet


class ReIDNet(ConvNet):
    """Grey image [B, 1, H, W] -> L2-normalised identity embedding [B, dim].

    A site's network may also carry a finding head (``n_findings > 0``) on the same features:
    the medical-task preservation loss of method A asks it whether a de-identified image still
    shows the findings of its original. Like the ReID part, it is trained on the site's own
    images and never leaves the site. Attackers are built without it.
    """

    def __init__(self, input_size: int = 64, dim: int = 64, n_findings: int = 0, patches: int = 0) -> None:
        super().__init__(input_size, dim)
        self.dim = dim
        self.finding_head = nn.Linear(self.head.in_features, n_findings) if n_findings else None
        # A site's network also carries its cohort's patch matchability (one value per blocking
        # patch, set by train_reid): it is saved and loaded with the network and stays at the site.
        self.matchability: torch.Tensor | None
        self.register_buffer("matchability", torch.zeros(patches) if patches else None)

    def embed_with_findings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Identity embedding [B, dim] and finding logits [B, F] (None without a finding head).

        Both come from one pass of the shared features: the training losses need both for the
        same images, and a second pass would double the backbone's cost (and, in training, move
        its BatchNorm statistics twice per batch).
        """
        pooled = self.features(x).mean(dim=(2, 3))
        logits = self.finding_head(pooled) if self.finding_head is not None else None
        return F.normalize(self.head(pooled), dim=1), logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(super().forward(x), dim=1)

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """Grad-CAM of the identity embedding: [B, 1, h, w] identity relevance per location.

        The score is the unnormalised embedding projected on its own (detached) direction, i.e.
        how strongly the image asserts its identity. For a linear head over global average
        pooling, Grad-CAM of this score is exact: the map sums to the score, each location's
        value is its additive contribution. No ReLU: every location is ranked, not only the
        positive ones.
        """
        with torch.enable_grad():
            feats = self.features(x.detach()).requires_grad_(True)
            raw = self.pool_head(feats)
            score = (raw * F.normalize(raw, dim=1).detach()).sum()
            (grad,) = torch.autograd.grad(score, feats)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        return (weights * feats).sum(dim=1, keepdim=True).detach()


class CosFaceLoss(nn.Module):
    """Large-margin cosine loss (Wang et al. 2018) with learnable class proxies."""

    def __init__(self, dim: int, n_classes: int, scale: float = 16.0, margin: float = 0.2) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(n_classes, dim) * 0.1)
        self.scale = scale
        self.margin = margin

    def forward(self, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cos = emb @ F.normalize(self.proxies, dim=1).T
        logits = self.scale * (cos - self.margin * F.one_hot(target, cos.shape[1]))
        return F.cross_entropy(logits, target)
