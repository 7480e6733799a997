"""The attacker suite: every re-identification attack a competent adversary would try.

A privacy figure is only as good as the strongest attacker it was measured with, so the
evaluation runs several attackers of different kinds and reports, per figure, the worst case
(the maximum over the suite) beside each attacker's own figure. Protocol, shared by all: the
gallery is each held-out patient's first acquisitions as *originals*, the queries are the other
acquisitions *de-identified*; every attacker turns them into a query × gallery similarity matrix
that :func:`fedeid.eval.metrics.similarity_metrics` scores.

Attackers (``names``):

* ``learned`` — a ReID network (CosFace metric learning) trained on the training patients'
  originals and the gallery originals (the attacker knows who the archive images are), at the
  full image resolution (``eval.attacker_size``).
* ``adaptive`` — the learned attacker fine-tuned on the training patients' images de-identified
  by the same method at the same level: it learns what survives.
* ``keypoint`` — OpenCV SIFT keypoints, Lowe's ratio test and a RANSAC similarity transform
  (``estimateAffinePartial2D``); the similarity is the number of geometrically consistent
  matches (plus a thousandth per putative match, which only orders pairs without inliers).
* ``patch`` — visible-patch matching: each query patch (``model.patch_size`` grid) is correlated
  (normalised cross-correlation) with the gallery image around the same place, searching
  ``eval.patch_shift`` pixels of shift; the similarity is the mean of the ``eval.patch_top_k``
  best patches. A few verbatim patches are enough for it.
* ``foundation`` — the frozen foundation model's feature map (the MFM of method A, known to
  re-identify on its own), average-pooled to a 4 × 4 grid, standardised with the training
  images' statistics, cosine similarity.
* ``foundation_tuned`` — the same features through a linear projection trained (CosFace) on the
  training patients' originals and their images de-identified by the method at that level.
* ``model_holder`` — the linkage attack of anyone holding the de-identification model (in a
  federation, every site): it de-identifies the gallery originals *as well* (a separate call,
  so a stochastic method draws anew) and compares like with like, with every other attacker of
  the run; it reports the one that re-identifies best (P@1, then mAP@R) — an oracle choice of
  matcher, so an upper bound of what a holder who picks one matcher in advance reaches.

Attackers whose result does not depend on the method (the learned network, the gallery's
keypoints, foundation features) are fitted or computed once, in the constructor.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedeid.config import Config
from fedeid.data.imageset import ImageSet
from fedeid.eval.metrics import cosine_similarity, similarity_metrics
from fedeid.models.encoder import build_encoder
from fedeid.models.reid import CosFaceLoss, ReIDNet
from fedeid.train import as_tensor, batched, patient_index, resolve_device, train_reid

Method = Callable[[np.ndarray, float], np.ndarray]

ATTACKERS: tuple[str, ...] = ("learned", "adaptive", "keypoint", "patch", "foundation", "foundation_tuned",
                              "model_holder")
# attackers that train on the method's de-identified training images at each level
TRAINED_PER_LEVEL: tuple[str, ...] = ("adaptive", "foundation_tuned")
# figures whose worst case (maximum over attackers) the suite reports; higher = more re-identified
WORST_FIGURES: tuple[str, ...] = ("p_at_1", "map_at_r", "verification_auc", "tpr_at_fpr_1e-2", "tpr_at_fpr_1e-3")

_FOUNDATION_GRID = 4  # pooled feature map side: keeps the coarse layout that identifies
_TUNED_DIM = 64
_TUNED_STEPS = 300
_SIFT_RATIO = 0.8  # Lowe's ratio test
_RANSAC_PX = 3.0  # reprojection threshold of a geometrically consistent match


def split_gallery(test: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    """Indices (gallery, queries): each patient's first half of images vs the rest."""
    gallery, queries = [], []
    for pid in np.unique(test.patient_ids):
        idx = np.flatnonzero(test.patient_ids == pid)
        half = max(1, len(idx) // 2)
        gallery.extend(idx[:half])
        queries.extend(idx[half:])
    return np.asarray(gallery), np.asarray(queries)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8 (clipped and rounded; NaN is refused, not cast to 0)."""
    a = np.asarray(images, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError("images hold non-finite values")
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


class Matcher(Protocol):
    """One attacker: ``match(queries, prepare(gallery))`` is its similarity matrix [Q, G]."""

    def prepare(self, gallery: np.ndarray) -> Any: ...

    def match(self, queries: np.ndarray, prepared: Any) -> np.ndarray: ...


class EmbeddingMatcher:
    """Any image -> vector map, compared by cosine similarity (learned nets, foundation features)."""

    def __init__(self, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        self.embed = embed

    def prepare(self, gallery: np.ndarray) -> np.ndarray:
        return self.embed(gallery)

    def match(self, queries: np.ndarray, prepared: np.ndarray) -> np.ndarray:
        return cosine_similarity(self.embed(queries), prepared)


class KeypointMatcher:
    """SIFT + ratio test + RANSAC similarity-transform inliers (OpenCV's implementations).

    A similarity transform (rotation, uniform scale, shift: 4 degrees of freedom) is what two
    acquisitions of one chest differ by; it needs two matches where a homography needs four, so
    it verifies the few keypoints a 128-px radiograph yields. OpenCV's SIFT already doubles the
    image for its first octave, so the images are not upscaled here.
    """

    def __init__(self, seed: int = 0) -> None:
        self.sift = cv2.SIFT_create()
        self.matcher = cv2.BFMatcher(cv2.NORM_L2)
        self.seed = seed

    def prepare(self, gallery: np.ndarray) -> list[tuple[np.ndarray, np.ndarray | None]]:
        out = []
        for image in to_uint8(gallery):
            keypoints, desc = self.sift.detectAndCompute(image, None)
            out.append((np.float32([k.pt for k in keypoints]).reshape(-1, 2), desc))
        return out

    def _inliers(self, q: tuple[np.ndarray, np.ndarray | None], g: tuple[np.ndarray, np.ndarray | None]) -> float:
        (q_pts, q_desc), (g_pts, g_desc) = q, g
        if q_desc is None or g_desc is None or len(g_desc) < 2:
            return 0.0
        good = [m for m, n in (p for p in self.matcher.knnMatch(q_desc, g_desc, k=2) if len(p) == 2)
                if m.distance < _SIFT_RATIO * n.distance]
        if len(good) < 2:
            return 1e-3 * len(good)
        src = q_pts[[m.queryIdx for m in good]]
        dst = g_pts[[m.trainIdx for m in good]]
        _, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=_RANSAC_PX,
                                                 maxIters=2000, confidence=0.995)
        return (0.0 if inliers is None else float(inliers.sum())) + 1e-3 * len(good)

    def match(self, queries: np.ndarray, prepared: list[tuple[np.ndarray, np.ndarray | None]]) -> np.ndarray:
        cv2.setRNGSeed(self.seed)  # RANSAC's draws: the same inputs give the same figures
        described = self.prepare(queries)
        return np.array([[self._inliers(q, g) for g in prepared] for q in described], dtype=np.float64)


class PatchMatcher:
    """Per-patch normalised cross-correlation with a shift search; mean of the best k patches.

    For every shift (dy, dx) in ±``shift`` pixels the gallery's patches at the query's grid
    positions plus that shift are correlated with the query's patches in one batched matrix
    product per shift ([P, Q, D] @ [P, D, G]); the best correlation over shifts is kept per patch
    and pair. Flat patches (no texture, e.g. a constant synthesised fill) correlate 0 with
    everything, so they can never identify.
    """

    def __init__(self, patch: int, shift: int, top_k: int) -> None:
        if patch < 2 or shift < 0 or top_k < 1:
            raise ValueError(f"patch matcher needs patch >= 2, shift >= 0, top_k >= 1; got {patch}, {shift}, {top_k}")
        self.patch, self.shift, self.top_k = patch, shift, top_k

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H, W] -> zero-mean, unit-norm patches [P, N, D] of the non-overlapping grid."""
        p = F.unfold(x[:, None], self.patch, stride=self.patch).permute(2, 0, 1)
        p = p - p.mean(-1, keepdim=True)
        norm = p.norm(dim=-1, keepdim=True)
        flat = norm < 1e-3 * math.sqrt(p.shape[-1])  # below ~1/4 grey level of std: no texture
        return torch.where(flat, torch.zeros_like(p), p / norm.clamp_min(1e-12))

    def prepare(self, gallery: np.ndarray) -> torch.Tensor:
        g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
        s = self.shift
        return F.pad(g[:, None], (s, s, s, s), mode="replicate")[:, 0] if s else g

    @torch.no_grad()
    def match(self, queries: np.ndarray, prepared: torch.Tensor) -> np.ndarray:
        q = self._normalised(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)))
        h, w = queries.shape[-2:]
        best = torch.full((q.shape[0], q.shape[1], prepared.shape[0]), -1.0)
        for dy in range(2 * self.shift + 1):
            for dx in range(2 * self.shift + 1):
                g = self._normalised(prepared[:, dy:dy + h, dx:dx + w])
                best = torch.maximum(best, torch.bmm(q, g.transpose(1, 2)))
        k = min(self.top_k, best.shape[0])
        return best.topk(k, dim=0).values.mean(0).double().numpy()


class FoundationFeatures:
    """The frozen foundation model's pooled feature map, standardised by reference statistics."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.encoder = build_encoder(cfg.model.encoder, cfg.data.image_size).to(device)
        self.device = device
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def raw(self, images: np.ndarray) -> np.ndarray:
        fn = lambda x: F.adaptive_avg_pool2d(self.encoder(x), _FOUNDATION_GRID).flatten(1)  # noqa: E731
        return batched(fn, as_tensor(images), self.device).numpy()

    def fit(self, reference: np.ndarray) -> np.ndarray:
        """Standardise with ``reference`` images' statistics; returns their standardised features."""
        feats = self.raw(reference)
        self.mean, self.std = feats.mean(0), feats.std(0) + 1e-6
        return (feats - self.mean) / self.std

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.mean is None or self.std is None:
            raise RuntimeError("FoundationFeatures.fit must run first")
        return (self.raw(images) - self.mean) / self.std


def fit_projection(features: np.ndarray, patient_ids: np.ndarray, seed: int, dim: int = _TUNED_DIM,
                   steps: int = _TUNED_STEPS) -> nn.Linear:
    """A linear projection of fixed features trained with CosFace on patient identity (full batch)."""
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = patient_index(patient_ids)
    proj = nn.Linear(x.shape[1], dim, bias=False)
    head = CosFaceLoss(dim, int(y.max()) + 1)
    opt = torch.optim.Adam([*proj.parameters(), *head.parameters()], lr=1e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = head(F.normalize(proj(F.dropout(x, 0.2)), dim=1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return proj.eval()


def _project(proj: nn.Linear, feats: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    def embed(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return proj(torch.from_numpy(feats(images))).numpy()
    return embed


class AttackSuite:
    """Every attacker a competent adversary would try, fitted once per evaluation."""

    def __init__(self, train: ImageSet, test: ImageSet, cfg: Config, *, progress: bool = True,
                 attackers: tuple[str, ...] | None = None) -> None:
        names = tuple(cfg.eval.attackers if attackers is None else attackers)
        unknown = [n for n in names if n not in ATTACKERS]
        if unknown or not names:
            raise ValueError(f"unknown attackers {unknown}; known: {', '.join(ATTACKERS)}")
        self.names = names
        self.cfg = cfg
        self.train, self.test = train, test
        self.device = resolve_device(cfg.train.device)
        self.gallery, self.queries = split_gallery(test)
        self.gallery_ids = test.patient_ids[self.gallery]
        self.query_ids = test.patient_ids[self.queries]
        originals = test.images[self.gallery]
        # the attacker knows who the archive (gallery) images are: it trains on them too
        self.attack_set = ImageSet.concat([train, test.subset(self.gallery)])
        e = cfg.eval
        self.fixed: dict[str, Matcher] = {}
        if {"learned", "adaptive", "model_holder"} & set(names):
            self.learned_net = train_reid(self.attack_set, cfg, epochs=e.attacker_epochs,
                                          init=ReIDNet(e.attacker_size, cfg.model.reid_dim),
                                          findings=False, progress=progress)
            self.fixed["learned"] = self._net_matcher(self.learned_net)
        if {"keypoint", "model_holder"} & set(names):
            self.fixed["keypoint"] = KeypointMatcher(cfg.data.seed)
        if {"patch", "model_holder"} & set(names):
            self.fixed["patch"] = PatchMatcher(cfg.model.patch_size, e.patch_shift, e.patch_top_k)
        if {"foundation", "foundation_tuned", "model_holder"} & set(names):
            self.features = FoundationFeatures(cfg, self.device)
            self.train_features = self.features.fit(self.attack_set.images)
            self.fixed["foundation"] = EmbeddingMatcher(self.features)
        self.prepared = {name: m.prepare(originals) for name, m in self.fixed.items()}

    def _net_matcher(self, net: ReIDNet) -> EmbeddingMatcher:
        return EmbeddingMatcher(lambda images: batched(net.eval(), as_tensor(images), self.device).numpy())

    def _per_level(self, names: set[str], deid_train: np.ndarray) -> dict[str, Matcher]:
        """The attackers retrained on the method's de-identified training images at this level."""
        out: dict[str, Matcher] = {}
        deid_set = self.train.with_images(deid_train)
        if "adaptive" in names:
            if np.array_equal(deid_train, self.train.images):  # nothing changed: retraining adds nothing
                out["adaptive"] = self.fixed["learned"]
            else:
                net = train_reid(ImageSet.concat([self.attack_set, deid_set]), self.cfg,
                                 epochs=self.cfg.eval.adaptive_epochs, init=copy.deepcopy(self.learned_net),
                                 findings=False)
                out["adaptive"] = self._net_matcher(net)
        if "foundation_tuned" in names:
            feats = np.concatenate([self.train_features, self.features(deid_train)])
            ids = np.concatenate([self.attack_set.patient_ids, self.train.patient_ids])
            out["foundation_tuned"] = EmbeddingMatcher(_project(fit_projection(feats, ids, self.cfg.train.seed),
                                                                self.features))
        return out

    def _run(self, method: Method, level: float, deid_test: np.ndarray | None, deid_train: np.ndarray | None,
             attackers: tuple[str, ...] | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        names = [n for n in self.names if attackers is None or n in attackers]
        if deid_test is None:
            deid_test = method(self.test.images, level)
        queries = deid_test[self.queries]
        holder = "model_holder" in names
        per_level = {n for n in TRAINED_PER_LEVEL if n in names}
        if per_level and deid_train is None:
            deid_train = method(self.train.images, level)
        matchers = {**self.fixed, **(self._per_level(per_level, deid_train) if per_level else {})}
        prepared = dict(self.prepared)
        for name in set(matchers) - set(prepared):
            prepared[name] = matchers[name].prepare(self.test.images[self.gallery])
        sims = {n: matchers[n].match(queries, prepared[n]) for n in names if n != "model_holder"}
        notes: dict[str, str] = {}
        if holder:
            held = method(self.test.images[self.gallery], level)
            candidates = {n: m.match(queries, m.prepare(held)) for n, m in matchers.items()}
            scored = {n: similarity_metrics(s, self.query_ids, self.gallery_ids) for n, s in candidates.items()}
            best = max(scored, key=lambda n: (scored[n]["p_at_1"], scored[n]["map_at_r"]))
            sims["model_holder"], notes["model_holder"] = candidates[best], best
        return sims, notes

    def similarities(self, method: Method, level: float, deid_test: np.ndarray | None = None,
                     deid_train: np.ndarray | None = None,
                     attackers: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """name -> sims[len(queries), len(gallery)] for ``method`` at ``level``.

        ``deid_test``: ``method(test.images, level)`` if the caller already has it; ``deid_train``
        likewise for the training images (the adaptive and tuned-foundation attackers retrain on
        it). ``attackers`` restricts the run to some of the suite's attackers.
        """
        return self._run(method, level, deid_test, deid_train, attackers)[0]

    def score(self, method: Method, level: float, deid_test: np.ndarray | None = None,
              deid_train: np.ndarray | None = None,
              attackers: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
        """name -> :func:`similarity_metrics` figures, plus ``"worst_case"``: per figure the
        maximum over the attackers, with ``"attacker"`` the one of the highest P@1. The model
        holder's entry also names the ``"matcher"`` it linked with."""
        sims, notes = self._run(method, level, deid_test, deid_train, attackers)
        out: dict[str, dict[str, Any]] = {
            n: similarity_metrics(s, self.query_ids, self.gallery_ids) for n, s in sims.items()}
        for n, matcher in notes.items():
            out[n]["matcher"] = matcher
        out["worst_case"] = worst_case(out)
        return out


def worst_case(by_attacker: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per figure the maximum over attackers (NaN figures ignored), and who reached the top P@1."""
    named = {n: m for n, m in by_attacker.items() if n != "worst_case"}
    if not named:
        raise ValueError("no attacker figures to take the worst case of")
    out: dict[str, Any] = {}
    for fig in WORST_FIGURES:
        values = [float(m[fig]) for m in named.values() if fig in m and np.isfinite(m[fig])]
        out[fig] = max(values) if values else math.nan
    first = next(iter(named.values()))
    out["chance_p_at_1"] = first["chance_p_at_1"]
    out["n_queries"] = first["n_queries"]
    # the first attacker (suite order) reaching the top P@1 names it: ties at level 0 are common
    out["attacker"] = max(named, key=lambda n: named[n]["p_at_1"])
    return out
