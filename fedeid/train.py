"""The one training loop of fedeid, used centrally, by each federated client, and by evaluation.

Three networks are trained with it: the site's ReID network (identity saliency), the
decoupler + decoder of method A, and the networks of the evaluation (attacker, finding
classifier). :func:`optimise` is the loop; the ``train_*`` functions only say what a step's loss
is. Federated clients call :func:`train_deid` for their local epochs, with an optional
``private`` hook that swaps in Opacus' DP-SGD and an optional FedProx proximal term.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedeid.config import Config
from fedeid.data.imageset import ImageSet
from fedeid.deid.blocking import (block_mask, cohort_matchability, gumbel_perturb, identity_relevance,
                                  patch_grid)
from fedeid.models.backbone import ConvNet
from fedeid.models.decoupler import cross_correlation, rate_nats
from fedeid.models.deid_model import DeIdModel
from fedeid.models.reid import CosFaceLoss, ReIDNet
from fedeid.progress import Progress

Batch = tuple[torch.Tensor, ...]
PrivateHook = Callable[[nn.Module, torch.optim.Optimizer, DataLoader], tuple[nn.Module, torch.optim.Optimizer, DataLoader]]

_FILL_POOL = 8  # blocked regions are supervised at 1/8 resolution: structure, not identifying detail
_ID_MARGIN = 0.0  # identity suppression pushes output-vs-input ReID cosine below this


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, H, W] float images -> [N, 1, H, W] float32 tensor (no copy where possible)."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]


def loader(tensors: Iterable[torch.Tensor], batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=gen)


def optimise(params: Iterable[nn.Parameter], data: DataLoader, epochs: int, lr: float,
             step: Callable[[Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]],
             *, desc: str = "train", progress: bool = False,
             optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """Adam over ``epochs`` passes; returns the last epoch's mean of every reported term.

    ``step(batch)`` returns the scalar loss and per-sample terms for reporting. Empty batches
    (Poisson sampling under DP-SGD can draw one) are skipped.
    """
    opt = optimizer or torch.optim.Adam(list(params), lr=lr)
    sums: dict[str, float] = {}
    count = 0
    bar = Progress(epochs * len(data), desc, "step", enabled=progress)
    for _ in range(epochs):
        sums, count = {}, 0
        for batch in data:
            if len(batch[0]) == 0:
                continue
            loss, terms = step(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = len(batch[0])
            count += n
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().sum())
            bar.update()
    bar.close()
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["num_examples"] = float(count)
    return out


def augment(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Small acquisition-like jitter (rotation, shift, scale, contrast) for the ReID/classifier nets."""
    b = x.shape[0]
    r = torch.rand(b, 5, generator=gen).to(x.device) * 2 - 1
    angle = r[:, 0] * math.radians(5)
    scale = 1 + 0.05 * r[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, 0.04 * r[:, 2]], 1),
                         torch.stack([sin, cos, 0.04 * r[:, 3]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    contrast = (1 + 0.15 * r[:, 4]).view(-1, 1, 1, 1)
    return ((x - 0.5) * contrast + 0.5).clamp(0, 1)


def patient_index(patient_ids: np.ndarray) -> torch.Tensor:
    """Patient ids -> contiguous class indices 0..P-1 (stable: sorted unique ids)."""
    _, idx = np.unique(patient_ids, return_inverse=True)
    return torch.from_numpy(idx.astype(np.int64))


def train_reid(data: ImageSet, cfg: Config, *, epochs: int | None = None, init: ReIDNet | None = None,
               findings: bool = True, device: torch.device | None = None, progress: bool = False) -> ReIDNet:
    """Metric learning on patient identity (CosFace over the patients of ``data``).

    With ``findings`` (a site's network) a finding head is trained jointly on the same features,
    for the medical-task preservation loss, and the cohort's patch matchability is stored in the
    network for blocking; attackers pass ``findings=False``.
    """
    device = device or resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    n_findings = len(data.finding_names) if findings else 0
    patches = patch_grid(cfg.data.image_size, cfg.model.patch_size) ** 2 if findings else 0
    net = (init or ReIDNet(cfg.model.reid_size, cfg.model.reid_dim, n_findings, patches)).to(device).train()
    if net.matchability is not None:
        net.matchability.copy_(cohort_matchability(as_tensor(data.images), data.patient_ids,
                                                   cfg.model.patch_size, seed=cfg.train.seed))
    targets = patient_index(data.patient_ids)
    head = CosFaceLoss(net.dim, int(targets.max()) + 1).to(device)

    def step(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, labels = (t.to(device) for t in batch)
        emb, logits = net.embed_with_findings(augment(x))
        loss = head(emb, y)
        if logits is not None:
            loss = loss + F.binary_cross_entropy_with_logits(logits, labels)
        return loss, {"reid_loss": loss.detach().expand(len(x))}

    optimise([*net.parameters(), *head.parameters()],
             loader([as_tensor(data.images), targets, torch.from_numpy(data.labels)],
                    cfg.train.batch_size, True, cfg.train.seed),
             cfg.train.reid_epochs if epochs is None else epochs, cfg.train.lr, step,
             desc="ReID", progress=progress)
    return net.eval()


def train_classifier(data: ImageSet, cfg: Config, *, input_size: int, epochs: int,
                     init: ConvNet | None = None, device: torch.device | None = None,
                     progress: bool = False) -> ConvNet:
    """Multi-label finding classifier (the utility probe of the evaluation)."""
    device = device or resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed + 1)
    net = (init or ConvNet(input_size, len(data.finding_names))).to(device).train()

    def step(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = (t.to(device) for t in batch)
        per = F.binary_cross_entropy_with_logits(net(augment(x)), y, reduction="none").mean(1)
        return per.mean(), {"cls_loss": per.detach()}

    optimise(net.parameters(), loader([as_tensor(data.images), torch.from_numpy(data.labels)],
                                      cfg.train.batch_size, True, cfg.train.seed),
             epochs, cfg.train.lr, step, desc="classifier", progress=progress)
    return net.eval()


def classifier_scores(net: ConvNet, images: np.ndarray, device: torch.device) -> np.ndarray:
    """A classifier's probabilities [N, F] for images [N, H, W] (evaluation mode, in batches)."""
    return torch.sigmoid(batched(net.eval(), as_tensor(images), device)).numpy()


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device,
            batch_size: int = 64) -> torch.Tensor:
    """Apply ``fn`` over ``x`` in batches on ``device``; results on the CPU."""
    return torch.cat([fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def identity_scores(reid: ReIDNet, x: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """Per-patch identity relevance [N, P]: Grad-CAM saliency with the cohort's matchability."""
    m = cfg.model
    return batched(lambda b: identity_relevance(reid, b, cfg.data.image_size, m.patch_size, m.matchability_weight),
                   x, device)


def train_deid(model: DeIdModel, reid: ReIDNet, data: ImageSet, cfg: Config, epochs: int, *,
               private: PrivateHook | None = None, proximal_mu: float = 0.0,
               global_state: dict[str, torch.Tensor] | None = None, device: torch.device | None = None,
               progress: bool = False) -> dict[str, float]:
    """Train decoupler + decoder with the losses of method A; returns per-sample mean terms.

    The frozen encoder's features, the ReID embeddings and the patch saliency of the original
    images are computed once up front (none of them change during this call). With
    ``proximal_mu > 0`` the FedProx term ``mu/2 * ||w - w_global||^2`` keeps a site near the
    global model it received.
    """
    t0 = time.perf_counter()
    t = cfg.train
    device = device or resolve_device(t.device)
    torch.manual_seed(t.seed)
    model.to(device).train()
    reid = reid.to(device).eval()
    for p in reid.parameters():
        p.requires_grad_(False)
    x_all = as_tensor(data.images)
    feats = batched(model.encode, x_all, device)
    ident = batched(reid, x_all, device)
    scores = identity_scores(reid, x_all, cfg, device)
    labels = torch.from_numpy(data.labels)

    w = dict(rec=t.w_rec, fill=t.w_fill, sem=t.w_sem, med=t.w_med, id=t.w_id, rate=t.w_rate,
             indep=t.w_indep, adv=t.w_adv, idcode=t.w_idcode, task=t.w_task)
    if reid.finding_head is None:
        w["task"] = 0.0
    if not cfg.model.decouple:
        w.update(rate=0.0, indep=0.0, adv=0.0, idcode=0.0)

    module: nn.Module = model.trainable()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=t.lr)
    data_loader = loader([x_all, feats, ident, scores, labels], t.batch_size, True, t.seed)
    if private is not None:
        module, optimizer, data_loader = private(module, optimizer, data_loader)
    named = dict(model.trainable().named_parameters())
    anchor = {k: v.to(device) for k, v in (global_state or {}).items() if k in named} if proximal_mu > 0 else {}
    s, ps = cfg.data.image_size, cfg.model.patch_size

    def step(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, f, e, sc, y = (v.to(device) for v in batch)
        level = torch.empty(len(x), device=device).uniform_(t.level_min, t.level_max)
        mask = block_mask(gumbel_perturb(sc, cfg.model.mask_temperature), level, s, ps)  # masks as released
        out, gen, codes, released = model(x, mask, level, feats=f, sample=True)
        terms = deid_losses(model, reid, x, mask, out, gen, codes, released, level, e, y)
        loss = sum(w[k] * terms[k] for k in w).mean()
        if anchor:
            loss = loss + proximal_mu / 2 * sum((named[k] - anchor[k]).pow(2).sum() for k in anchor)
        return loss, terms

    metrics = optimise(params, data_loader, epochs, t.lr, step, desc="de-id", progress=progress,
                       optimizer=optimizer)
    model.eval()
    metrics["train_seconds"] = time.perf_counter() - t0
    return metrics


def deid_losses(model: DeIdModel, reid: ReIDNet, x: torch.Tensor, mask: torch.Tensor, out: torch.Tensor,
                gen: torch.Tensor, codes: Any, released: torch.Tensor, level: torch.Tensor, ident: torch.Tensor,
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Method A's loss terms, each per sample [B] (so DP-SGD can clip per sample).

    The blocked regions are asked to match the original's low resolution only as far as the
    released code still carries it (weight ``1 - level``), and the output's medical code must
    equal the *released* code: at level 1 the decoder renders the noise it was given as anatomy,
    not the patient's (which it no longer sees).
    """
    visible = 1 - mask
    rec = ((gen - x).abs() * visible).flatten(1).sum(1) / visible.flatten(1).sum(1).clamp(min=1)
    pm = F.avg_pool2d(mask, _FILL_POOL)
    fill = ((F.avg_pool2d(gen, _FILL_POOL) - F.avg_pool2d(x, _FILL_POOL)).abs() * pm).flatten(1).sum(1)
    fill = (1 - level) * fill / pm.flatten(1).sum(1).clamp(min=1e-6)
    dec = model.decoupler
    out_mu = dec.medical_mean(model.encode(out))
    sem = (out_mu - released.detach()).pow(2).flatten(1).mean(1)
    med = (F.binary_cross_entropy_with_logits(dec.finding_logits(codes.medical), labels, reduction="none").mean(1)
           + F.binary_cross_entropy_with_logits(dec.finding_logits(out_mu), labels, reduction="none").mean(1))
    blocked = mask.flatten(1).mean(1)
    emb, finding_logits = reid.embed_with_findings(out)
    id_sim = (emb * ident).sum(1)
    task = (F.binary_cross_entropy_with_logits(finding_logits, labels, reduction="none").mean(1)
            if finding_logits is not None else torch.zeros_like(rec))
    return {
        "task": task,
        "rec": rec,
        "fill": fill,
        "sem": sem,
        "med": med,
        "id": blocked * (id_sim - _ID_MARGIN).clamp(min=0),
        "rate": rate_nats(codes) / codes.mu[0].numel(),  # nats per code element
        "indep": cross_correlation(codes.mu, codes.identity),
        "adv": 1 - (dec.adversary_embedding(codes) * ident).sum(1),
        "idcode": 1 - (dec.identity_embedding(codes) * ident).sum(1),
    }
