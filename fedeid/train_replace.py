"""Training of method B (identity replacement), through the one loop of :mod:`fedeid.train`.

A step encodes each image into (identity, medical, other), rebuilds it, and generates a *swapped*
image: per sample, either the identity is replaced (by a point between two *other* patients'
identities) or one finding of the medical vector is flipped. The swapped image is re-encoded and
the kept vectors must come back (swap consistency); the site's ReID network, frozen, must see
the new identity (or still the old one) and the new findings in it. This one term teaches both
uses of the model: de-identification (identity replaced, findings kept) and counterfactuals
(finding changed, identity kept).

Every term is per sample and each sample's terms depend only on that sample, its random draws,
and constants fixed before the loop (the frozen networks and the patients' mean ReID embeddings —
the same standing as method A's ReID targets), so Opacus' per-sample clipping bounds one image's
influence, as for method A.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from fedeid.config import Config
from fedeid.data.imageset import ImageSet
from fedeid.models.identity_prior import IdentityPrior
from fedeid.models.reid import ReIDNet
from fedeid.models.replace import ReplaceModel, Vectors
from fedeid.train import Batch, PrivateHook, as_tensor, batched, loader, optimise, patient_index, resolve_device

CF_LOGIT = 4.0  # a finding set by a counterfactual: its logit becomes +-4 (probability 0.98 / 0.02)
_COSFACE_SCALE, _COSFACE_MARGIN = 16.0, 0.2  # as fedeid.models.reid.CosFaceLoss


def patient_proxies(reid: ReIDNet, data: ImageSet, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Each patient's mean centred ReID embedding, unit norm [P, D]; each image's patient index [N];
    the centre [D]).

    Centred: a ReID network's embeddings of different patients share a large common component
    (cosine 0.6-0.9 between patients on the synthetic benchmark). Uncentred proxies crowd into one
    cap of the sphere, CosFace against them barely moves, and the identity vectors collapse onto
    the common direction (measured: every pair of patients at cosine > 0.9999 after training).
    """
    emb = batched(reid.eval(), as_tensor(data.images), device)
    centre = emb.mean(0)
    target = patient_index(data.patient_ids)
    proxies = torch.zeros(int(target.max()) + 1, emb.shape[1]).index_add_(0, target, emb - centre)
    return F.normalize(proxies, dim=1), target, centre


def cosface(identity: torch.Tensor, proxies: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample CosFace loss of unit identity vectors against fixed patient proxies [B]."""
    cos = identity @ proxies.T
    logits = _COSFACE_SCALE * (cos - _COSFACE_MARGIN * F.one_hot(target, cos.shape[1]))
    return F.cross_entropy(logits, target, reduction="none")


def swap_targets(v: Vectors, labels: torch.Tensor, target: torch.Tensor, proxies: torch.Tensor,
                 n_findings: int, gen: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample, replace the identity or flip one finding: (identity, medical, labels, swapped-identity mask).

    A replaced identity is a random point between two other patients' proxies (a synthetic
    identity at inference lies between patients too); a flipped finding's logit becomes
    ``+-CF_LOGIT``. The vectors keep their graph (the encoder learns through the generator).
    """
    b, p = len(target), len(proxies)
    dev = labels.device
    swap_id = torch.rand(b, generator=gen).to(dev) < 0.5
    # two patients other than the sample's own: offsets in 1..P-1 never land on it
    j = (target + torch.randint(1, max(p, 2), (b,), generator=gen).to(dev)) % p
    k = (target + torch.randint(1, max(p, 2), (b,), generator=gen).to(dev)) % p
    a = torch.rand(b, 1, generator=gen).to(dev)
    z = F.normalize(a * proxies[j] + (1 - a) * proxies[k], dim=1)
    identity = torch.where(swap_id[:, None], z, v.identity)
    flip = F.one_hot(torch.randint(n_findings, (b,), generator=gen).to(dev), n_findings).float()
    flip = flip * (~swap_id)[:, None].float()
    new_labels = labels + flip * (1 - 2 * labels)
    logits = v.medical[:, :n_findings]
    logits = logits * (1 - flip) + flip * CF_LOGIT * (2 * new_labels - 1)
    medical = torch.cat([logits, v.medical[:, n_findings:]], dim=1)
    return identity, medical, new_labels, swap_id


def replace_losses(model: ReplaceModel, reid: ReIDNet, x: torch.Tensor, labels: torch.Tensor,
                   target: torch.Tensor, proxies: torch.Tensor, centre: torch.Tensor,
                   gen: torch.Generator | None = None
                   ) -> dict[str, torch.Tensor]:
    """Method B's loss terms, each per sample [B]."""
    nf = model.n_findings
    v = model.vectors(x)
    rec = model.generate(v.identity, v.medical, v.other)
    id_s, med_s, labels_s, _ = swap_targets(v, labels, target, proxies, nf, gen)
    swapped = model.generate(id_s, med_s, v.other)
    w = model.vectors(swapped)  # re-encode: the kept (and the new) vectors must come back
    bce = lambda logits, y: F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)  # noqa: E731
    swap = ((1 - (w.identity * id_s.detach()).sum(1))
            + (w.medical[:, nf:] - med_s[:, nf:].detach()).pow(2).mean(1)
            + (w.other - v.other.detach()).pow(2).mean(1))
    emb, judge_logits = reid.embed_with_findings(torch.cat([rec, swapped]))
    emb_rec, emb_s = F.normalize(emb - centre, dim=1).chunk(2)  # the identity space is the centred ReID space
    judge = (1 - (emb_s * id_s.detach()).sum(1)) + (1 - (emb_rec * proxies[target]).sum(1))
    if judge_logits is not None:
        logit_rec, logit_s = judge_logits.chunk(2)
        judge = judge + bce(logit_rec, labels) + bce(logit_s, labels_s)
    return {
        "rec": (rec - x).abs().flatten(1).mean(1),
        "swap": swap,
        "id": cosface(v.identity, proxies, target),
        "med": bce(model.finding_logits(v), labels) + bce(model.finding_logits(w), labels_s),
        "judge": judge,
    }


def train_replace(model: ReplaceModel, reid: ReIDNet, data: ImageSet, cfg: Config, epochs: int, *,
                  private: PrivateHook | None = None, proximal_mu: float = 0.0,
                  global_state: dict[str, torch.Tensor] | None = None, device: torch.device | None = None,
                  progress: bool = False) -> dict[str, float]:
    """Train the encoder heads + generator of method B; returns per-sample mean terms (as ``train_deid``).

    The site's ReID network is frozen: it fixes the identity space (the patients' proxies) and
    judges the generated images. ``private``/``proximal_mu`` work as in :func:`fedeid.train.train_deid`.
    """
    t0 = time.perf_counter()
    r = cfg.replace
    device = device or resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model.to(device).train()
    reid = reid.to(device).eval()
    for p in reid.parameters():
        p.requires_grad_(False)
    x_all = as_tensor(data.images)
    proxies, targets, centre = patient_proxies(reid, data, device)
    proxies, centre = proxies.to(device), centre.to(device)
    labels = torch.from_numpy(data.labels)
    w = dict(rec=r.w_rec, swap=r.w_swap, id=r.w_id, med=r.w_med, judge=r.w_judge)

    module = model.trainable()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.train.lr)
    data_loader = loader([x_all, labels, targets], cfg.train.batch_size, True, cfg.train.seed)
    if private is not None:
        _, optimizer, data_loader = private(module, optimizer, data_loader)
    named = dict(module.named_parameters())
    anchor = {k: v.to(device) for k, v in (global_state or {}).items() if k in named} if proximal_mu > 0 else {}

    def step(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, t = (v.to(device) for v in batch)
        terms = replace_losses(model, reid, x, y, t, proxies, centre)
        loss = sum(w[k] * terms[k] for k in w).mean()
        if anchor:
            loss = loss + proximal_mu / 2 * sum((named[k] - anchor[k]).pow(2).sum() for k in anchor)
        return loss, terms

    metrics = optimise(params, data_loader, epochs, cfg.train.lr, step, desc="replace", progress=progress,
                       optimizer=optimizer)
    model.eval()
    metrics["train_seconds"] = time.perf_counter() - t0
    return metrics


@torch.no_grad()
def fit_identity_prior(model: ReplaceModel, data: ImageSet, cfg: Config,
                       device: torch.device | None = None) -> IdentityPrior:
    """The site's synthetic-identity prior, fitted to the trained encoder's identity vectors of its
    images, with the residual prior fitted to the same images' other vectors."""
    device = device or resolve_device(cfg.train.device)
    model.to(device).eval()
    def identity_and_residual(x: torch.Tensor) -> torch.Tensor:
        v = model.vectors(x)
        return torch.cat([v.identity, model.residual(v)], dim=1)

    vectors = batched(identity_and_residual, as_tensor(data.images), device).numpy()
    ids, residual = vectors[:, :cfg.model.reid_dim], vectors[:, cfg.model.reid_dim:]
    r = cfg.replace
    return IdentityPrior.fit(ids, data.patient_ids, residual=residual, components=r.prior_components,
                             fpr=r.prior_fpr, bank_size=r.prior_bank, seed=cfg.train.seed)


def training_summary(metrics: dict[str, float], prior: IdentityPrior) -> dict[str, Any]:
    """What a method-B checkpoint and report record about its training and its prior."""
    return {"training": metrics, "identity_prior": dict(vars(prior.report))}

