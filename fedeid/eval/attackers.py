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
* ``foundation_tuned`` — the same features through a linear projection fitted (linear
  discriminant analysis on patient identity) to the training patients' originals, the gallery
  originals and the training images de-identified by the method at that level.
* ``model_holder`` — the linkage attack of anyone holding the de-identification model (in a
  federation, every site): it de-identifies the gallery originals *as well* (a separate call,
  so a stochastic method draws anew) and compares like with like, with every other attacker of
  the run; it reports the one that re-identifies best (P@1, then mAP@R) — an oracle choice of
  matcher, so an upper bound of what a holder who picks one matcher in advance reaches. Its
  candidates include the fusions below of its own matchers.
* ``fusion`` — score-level fusion (:func:`fused`): each attacker's similarities standardised per
  query (z-scores over the gallery) and summed, over all the attackers above and over every pair
  of them; it reports the fusion (or single attacker) that re-identifies best, an oracle choice
  like the model holder's, so it is never below the best of its inputs. Attackers that fail on
  different queries add up: measured on the quick preset's central model at level 0.2,
  adaptive (0.68) and patch (0.45) fused linked 0.78.

Attackers whose result does not depend on the method (the learned network, the gallery's
keypoints, foundation features) are fitted or computed once, in the constructor.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.pipeline import make_pipeline

from fedeid.config import Config
from fedeid.data.imageset import ImageSet
from fedeid.eval.metrics import cosine_similarity, similarity_metrics
from fedeid.models.encoder import build_encoder
from fedeid.models.reid import ReIDNet
from fedeid.train import as_tensor, batched, resolve_device, train_reid

Method = Callable[[np.ndarray, float], np.ndarray]

ATTACKERS: tuple[str, ...] = ("learned", "adaptive", "keypoint", "patch", "foundation", "foundation_tuned",
                              "model_holder", "fusion")
# attackers built from the others' similarities rather than matchers of their own
COMBINED: tuple[str, ...] = ("model_holder", "fusion")
# attackers that train on the method's de-identified training images at each level
TRAINED_PER_LEVEL: tuple[str, ...] = ("adaptive", "foundation_tuned")
# figures whose worst case (maximum over attackers) the suite reports; higher = more re-identified
WORST_FIGURES: tuple[str, ...] = ("p_at_1", "map_at_r", "verification_auc", "tpr_at_fpr_1e-2", "tpr_at_fpr_1e-3")

_FOUNDATION_GRID = 4  # pooled feature map side: keeps the coarse layout that identifies
_TUNED_PCA = 128  # dimensions kept before the tuned projection
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
    image for its first octave, so the images are not upscaled here. Nearest neighbours for the
    ratio test come from one distance computation per query against every gallery descriptor
    (the same two nearest neighbours OpenCV's brute-force matcher finds, without a Python call
    per image pair); only RANSAC runs per pair.
    """

    def __init__(self, seed: int = 0) -> None:
        self.sift = cv2.SIFT_create()
        self.seed = seed

    def _describe(self, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for image in to_uint8(images):
            keypoints, desc = self.sift.detectAndCompute(image, None)
            pts = np.float32([k.pt for k in keypoints]).reshape(-1, 2)
            out.append((pts, np.zeros((0, 128), np.float32) if desc is None else desc.astype(np.float32)))
        return out

    def prepare(self, gallery: np.ndarray) -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor]:
        """Gallery keypoints, descriptors padded to [G, K, 128] and their squared norms (inf = padding)."""
        described = self._describe(gallery)
        k = max(2, max(len(d) for _, d in described))
        desc = torch.zeros(len(described), k, 128)
        sq = torch.full((len(described), k), math.inf)
        for i, (_, d) in enumerate(described):
            desc[i, :len(d)] = torch.from_numpy(d)
            sq[i, :len(d)] = torch.from_numpy((d.astype(np.float64) ** 2).sum(1).astype(np.float32))
        return [p for p, _ in described], desc, sq

    @torch.no_grad()
    def match(self, queries: np.ndarray, prepared: tuple[list[np.ndarray], torch.Tensor, torch.Tensor]) -> np.ndarray:
        cv2.setRNGSeed(self.seed)  # RANSAC's draws: the same inputs give the same figures
        g_pts, g_desc, g_sq = prepared
        sims = np.zeros((len(queries), len(g_pts)))
        for i, (q_pts, q_desc) in enumerate(self._describe(queries)):
            if len(q_desc) == 0:
                continue
            q = torch.from_numpy(q_desc)
            d2 = (q * q).sum(1)[None, :, None] + g_sq[:, None, :] - 2 * torch.einsum("nd,gkd->gnk", q, g_desc)
            two = d2.clamp_min(0).topk(2, dim=2, largest=False)
            dist = two.values.sqrt()
            good = dist[..., 0] < _SIFT_RATIO * dist[..., 1]  # [G, n]; padding is inf: never good
            for j in range(len(g_pts)):
                n_good = int(good[j].sum())
                if n_good < 2:
                    sims[i, j] = 1e-3 * n_good
                    continue
                src = q_pts[good[j].numpy()]
                dst = g_pts[j][two.indices[j, :, 0][good[j]].numpy()]
                _, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=_RANSAC_PX,
                                                         maxIters=2000, confidence=0.995)
                sims[i, j] = (0.0 if inliers is None else float(inliers.sum())) + 1e-3 * n_good
        return sims


class PatchMatcher:
    """Per-patch normalised cross-correlation with a shift search; mean of the best k patches.

    Each query patch of the ``patch`` grid is correlated with the gallery image in a window of
    ±``shift`` pixels around the same place: one grouped convolution (patch positions as groups)
    gives every query patch's correlation with every gallery window at every shift, divided by
    the gallery patch norms at each shift (box sums, computed once per gallery). The best shift
    is kept per patch and pair, and a pair's similarity is the mean of its ``top_k`` best patches.
    Flat patches (no texture, e.g. a constant synthesised fill) correlate 0 with everything, so
    they can never identify.
    """

    def __init__(self, patch: int, shift: int, top_k: int, chunk: int = 32) -> None:
        if patch < 2 or shift < 0 or top_k < 1:
            raise ValueError(f"patch matcher needs patch >= 2, shift >= 0, top_k >= 1; got {patch}, {shift}, {top_k}")
        self.patch, self.shift, self.top_k, self.chunk = patch, shift, top_k, chunk

    def _flat(self, sum_sq: torch.Tensor) -> torch.Tensor:
        return sum_sq < (1e-3 ** 2) * self.patch ** 2  # std below ~1/4 grey level: no texture

    def prepare(self, gallery: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Gallery windows [G, P, p + 2s, p + 2s] and inverse patch norms at every shift [G, P, 2s+1, 2s+1]."""
        p, s = self.patch, self.shift
        g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float64))[:, None]
        g = F.pad(g, (s, s, s, s), mode="replicate") if s else g
        w = p + 2 * s
        windows = g.unfold(2, w, p).unfold(3, w, p)  # [G, 1, nh, nw, w, w]
        windows = windows.reshape(len(g), -1, w, w)
        mean = F.avg_pool2d(windows, p, stride=1)
        sum_sq = (F.avg_pool2d(windows ** 2, p, stride=1) - mean ** 2).clamp_min(0) * p * p
        inv = torch.where(self._flat(sum_sq), torch.zeros_like(sum_sq), sum_sq.clamp_min(1e-24).rsqrt())
        return windows.float(), inv.float()

    @torch.no_grad()
    def match(self, queries: np.ndarray, prepared: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
        windows, inv = prepared
        n_pos = windows.shape[1]
        x = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float64))[:, None]
        q = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # [Q, P, D]
        if q.shape[1] != n_pos:
            raise ValueError(f"queries of shape {queries.shape[1:]} do not fit the gallery's patch grid")
        q = q - q.mean(-1, keepdim=True)
        sum_sq = (q ** 2).sum(-1, keepdim=True)
        q = torch.where(self._flat(sum_sq), torch.zeros_like(q), q * sum_sq.clamp_min(1e-24).rsqrt()).float()
        k = min(self.top_k, n_pos)
        out = []
        for start in range(0, len(q), self.chunk):
            qc = q[start:start + self.chunk]  # [c, P, D]
            weight = qc.transpose(0, 1).reshape(n_pos * len(qc), 1, self.patch, self.patch)
            corr = F.conv2d(windows, weight, groups=n_pos)  # [G, P * c, 2s+1, 2s+1]
            corr = corr.view(len(windows), n_pos, len(qc), *corr.shape[-2:]) * inv[:, :, None]
            best = corr.flatten(3).amax(3)  # [G, P, c]
            out.append(best.topk(k, dim=1).values.mean(1).T)  # [c, G]
        return torch.cat(out).double().numpy()


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


def fit_projection(features: np.ndarray, patient_ids: np.ndarray,
                   components: int = _TUNED_PCA) -> Callable[[np.ndarray], np.ndarray]:
    """PCA then linear discriminant analysis on patient identity (scikit-learn).

    The closed-form linear metric learning: the projection that maximises between-patient over
    within-patient variance of the given features, with a shrunk (Ledoit–Wolf) within-patient
    covariance so that it stays defined on few images. PCA to ``components`` dimensions first
    keeps the per-patient covariances small (LDA on the raw 1,792 dimensions took 15 times
    longer); no iterations.
    """
    n = min(components, len(features) - 1, features.shape[1])
    model = make_pipeline(PCA(n, random_state=0), LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto"))
    with warnings.catch_warnings():
        # a gallery patient has one image: its covariance is empty, which shrinkage absorbs
        warnings.filterwarnings("ignore", message="Only one sample available")
        model.fit(features.astype(np.float64), patient_ids)
    return model.transform


def _project(project: Callable[[np.ndarray], np.ndarray],
             feats: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda images: project(feats(images).astype(np.float64))


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
            out["foundation_tuned"] = EmbeddingMatcher(_project(fit_projection(feats, ids), self.features))
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
        sims = {n: matchers[n].match(queries, prepared[n]) for n in names if n not in COMBINED}
        notes: dict[str, str] = {}
        if "fusion" in names:
            if not sims:
                raise ValueError("the fusion attacker needs at least one other attacker of the suite to fuse")
            notes["fusion"], sims["fusion"] = self._strongest(sims)
        if holder:
            held = method(self.test.images[self.gallery], level)
            notes["model_holder"], sims["model_holder"] = self._strongest(
                {n: m.match(queries, m.prepare(held)) for n, m in matchers.items()})
        return {n: sims[n] for n in names}, notes  # in the suite's order

    def _strongest(self, sims: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
        """Of these attackers and their fusions (a single attacker is the fusion that weighs the
        rest 0), the one that re-identifies best (P@1, then mAP@R): an oracle choice."""
        candidates = {**sims, **fused(sims)}
        scored = {n: similarity_metrics(s, self.query_ids, self.gallery_ids) for n, s in candidates.items()}
        best = max(scored, key=lambda n: (scored[n]["p_at_1"], scored[n]["map_at_r"]))
        return best, candidates[best]

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
        holder's and the fusion's entries also name the ``"matcher"`` they linked with."""
        sims, notes = self._run(method, level, deid_test, deid_train, attackers)
        out: dict[str, dict[str, Any]] = {
            n: similarity_metrics(s, self.query_ids, self.gallery_ids) for n, s in sims.items()}
        for n, matcher in notes.items():
            out[n]["matcher"] = matcher
        out["worst_case"] = worst_case(out)
        return out


def standardised(sims: np.ndarray) -> np.ndarray:
    """Similarities [Q, G] as z-scores within each query's row (a constant row becomes 0): the
    scale every attacker shares, whether it counts inliers or measures cosines."""
    s = np.nan_to_num(np.asarray(sims, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return (s - s.mean(1, keepdims=True)) / np.maximum(s.std(1, keepdims=True), 1e-12)


def fused(sims: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Score-level fusions of attackers: the sum of standardised similarities of every pair
    (``"a+b"``) and of all of them (``"all"``, from three on). Fewer than two attackers: none."""
    z = {n: standardised(s) for n, s in sims.items()}
    names = list(z)
    out = {f"{a}+{b}": z[a] + z[b] for i, a in enumerate(names) for b in names[i + 1:]}
    if len(names) > 2:
        out["all"] = sum(z.values())
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
