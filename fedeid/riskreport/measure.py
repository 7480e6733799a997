"""Every figure of the risk report, measured on held-out patients, with bootstrap intervals.

Uncertainty comes from which patients happened to be in the test set, so intervals resample
*patients* with replacement (all of a drawn patient's query images come along) and recompute each
figure from the attackers' real query × gallery similarity matrices with
:func:`fedeid.eval.metrics.similarity_metrics`. The gallery stays fixed: it is the attacker's
archive, not a sample. The same patient draws serve every attacker, level and figure, so
before/after comparisons are paired.

WP29 (Opinion 05/2014 on anonymisation) asks three questions; the report answers each with a
measurement:

* **linkability** — can a released image be linked to the same person's image elsewhere? The
  re-identification figures of every attacker against an archive of originals.
* **singling out** — does a released image isolate one individual? The nearest-neighbour
  distance ratio (Lowe's test): with distances ``d = max(S) − S`` from an attacker's similarity
  matrix, a query whose nearest gallery *patient* is much closer than the second
  (``d1 / d2 < 0.8``) stands out; the report counts those, and those that stand out *as the right
  patient*.
* **inference** — can an attribute be deduced from the pixels? A logistic-regression attacker
  trained on de-identified training images predicts each test image's site of origin (hospital
  and scanner, where the data records it); accuracy against the majority-class rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from fedeid.config import Config
from fedeid.data.imageset import ImageSet
from fedeid.eval.metrics import per_finding_auc, psnr_per_image, similarity_metrics, ssim_per_image

Method = Callable[[np.ndarray, float], np.ndarray]
REID_FIGURES = ("p_at_1", "map_at_r", "verification_auc", "tpr_at_fpr_1e-2", "tpr_at_fpr_1e-3")
NNDR_THRESHOLD = 0.8  # Lowe (2004): below it a nearest match is distinctive
INFERENCE_SIZE = 16  # the attribute attacker sees 16 x 16 block means: scanner contrast, not anatomy


class Suite(Protocol):
    """What the report needs of :class:`fedeid.eval.attackers.AttackSuite`."""

    names: tuple[str, ...]
    gallery: np.ndarray
    queries: np.ndarray

    def similarities(self, method: Method, level: float, deid_test: np.ndarray | None = None,
                     deid_train: np.ndarray | None = None) -> dict[str, np.ndarray]: ...


def identity(images: np.ndarray, level: float) -> np.ndarray:
    return images


def patient_draws(ids: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """``n`` bootstrap samples of row indices: patients drawn with replacement, all their rows each."""
    patients = np.unique(ids)
    rows = {p: np.flatnonzero(ids == p) for p in patients}
    rng = np.random.default_rng(seed)
    return [np.concatenate([rows[p] for p in rng.choice(patients, len(patients))]) for _ in range(n)]


def interval(point: float | None, samples: list[float]) -> dict[str, Any]:
    """``{"value", "low", "high"}``: the point estimate and the 95 % percentile interval."""
    finite = np.asarray([s for s in samples if s is not None and np.isfinite(s)], dtype=float)
    lo, hi = (np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan))
    return {"value": None if point is None or not np.isfinite(point) else float(point),
            "low": float(lo) if np.isfinite(lo) else None, "high": float(hi) if np.isfinite(hi) else None}


def reid_figures(sims: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray, draws: list[np.ndarray]
                 ) -> dict[str, Any]:
    """Every re-identification figure of one attacker with its patient-bootstrap interval."""
    point = similarity_metrics(sims, q_ids, g_ids)
    boot = [similarity_metrics(sims[rows], q_ids[rows], g_ids) for rows in draws]
    out = {k: interval(point[k], [b[k] for b in boot]) for k in REID_FIGURES}
    out["chance_p_at_1"] = point["chance_p_at_1"]
    out["n_queries"] = point["n_queries"]
    return out


def nndr(sims: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query: nearest-to-second-nearest *patient* distance ratio, and whether the nearest is right."""
    patients = np.unique(g_ids)
    per_patient = np.stack([sims[:, g_ids == p].max(axis=1) for p in patients], axis=1)
    dist = per_patient.max() - per_patient
    order = np.argsort(dist, axis=1, kind="stable")
    rows = np.arange(len(dist))
    d1, d2 = dist[rows, order[:, 0]], dist[rows, order[:, 1]] if len(patients) > 1 else np.inf
    ratio = np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1.0), 1.0)
    return ratio, patients[order[:, 0]] == q_ids


def singling_out(sims: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray, draws: list[np.ndarray]
                 ) -> dict[str, Any]:
    ratio, right = nndr(sims, q_ids, g_ids)
    stands_out = ratio < NNDR_THRESHOLD
    return {"median_ratio": interval(float(np.median(ratio)), [float(np.median(ratio[r])) for r in draws]),
            "singled_out": interval(float(stands_out.mean()), [float(stands_out[r].mean()) for r in draws]),
            "singled_out_correctly": interval(float((stands_out & right).mean()),
                                              [float((stands_out & right)[r].mean()) for r in draws])}


def _inference_features(images: np.ndarray) -> np.ndarray:
    n, h, w = images.shape
    k = max(1, h // INFERENCE_SIZE)
    cropped = images[:, : h // k * k, : w // k * k]
    return cropped.reshape(n, h // k, k, w // k, k).mean(axis=(2, 4)).reshape(n, -1)


def attribute_inference(train_images: np.ndarray, train_attr: np.ndarray, test_images: np.ndarray,
                        test_attr: np.ndarray, draws: list[np.ndarray], seed: int) -> dict[str, Any]:
    """Accuracy of predicting an attribute from pixels, and the majority-class rate it must beat."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(_inference_features(train_images), train_attr)
    hit = clf.predict(_inference_features(test_images)) == test_attr
    values, counts = np.unique(test_attr, return_counts=True)
    return {"accuracy": interval(float(hit.mean()), [float(hit[r].mean()) for r in draws]),
            "chance": float(counts.max() / counts.sum()), "classes": int(len(values))}


def finding_utility(labels: np.ndarray, scores: np.ndarray, names: tuple[str, ...], draws: list[np.ndarray]
                    ) -> dict[str, Any]:
    point = per_finding_auc(labels, scores, names)
    boot = [per_finding_auc(labels[r], scores[r], names) for r in draws]
    return {f: interval(v, [b.get(f) for b in boot]) for f, v in point.items()}


def quality(deid: np.ndarray, original: np.ndarray, draws: list[np.ndarray]) -> dict[str, Any]:
    s = ssim_per_image(deid, original)
    with np.errstate(divide="ignore"):
        p = np.minimum(psnr_per_image(deid, original), 100.0)  # identical images: capped, not infinite
    return {"ssim": interval(float(s.mean()), [float(s[r].mean()) for r in draws]),
            "psnr_db": interval(float(p.mean()), [float(p[r].mean()) for r in draws])}


def assess(suite: Suite, method: Method, level: float, train: ImageSet, test: ImageSet, cfg: Config,
           *, bootstrap: int = 500, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """The report's measured figures: before (originals) and after (``method`` at ``level``)."""
    import torch

    from fedeid.models.deid_model import cfg_findings
    from fedeid.train import as_tensor, batched, resolve_device, train_classifier

    deid_test = method(test.images, level)
    deid_train = method(train.images, level)  # the adaptive attackers and the inference attacker train on it
    q, g = np.asarray(suite.queries), np.asarray(suite.gallery)
    q_ids, g_ids = test.patient_ids[q], test.patient_ids[g]
    q_draws = patient_draws(q_ids, bootstrap, seed)
    all_draws = patient_draws(test.patient_ids, bootstrap, seed + 1)
    before = suite.similarities(identity, 0.0, deid_test=test.images, deid_train=train.images)
    after = suite.similarities(method, level, deid_test=deid_test, deid_train=deid_train)
    attackers = {}
    for name in suite.names:
        attackers[name] = {
            "before": reid_figures(before[name], q_ids, g_ids, q_draws),
            "after": reid_figures(after[name], q_ids, g_ids, q_draws),
            "singling_out": {"before": singling_out(before[name], q_ids, g_ids, q_draws),
                             "after": singling_out(after[name], q_ids, g_ids, q_draws)},
        }
    worst_first = sorted(attackers, key=lambda n: -(attackers[n]["after"]["p_at_1"]["value"] or 0.0))
    worst = {when: {k: max((attackers[n][when][k]["value"] or 0.0) for n in attackers) for k in REID_FIGURES}
             for when in ("before", "after")}

    inference: dict[str, Any] = {"attribute": "site of origin (hospital / scanner)"}
    if len(np.unique(test.sites)) > 1 and np.isin(test.sites, train.sites).all():
        inference["before"] = attribute_inference(train.images, train.sites, test.images, test.sites, all_draws, seed)
        inference["after"] = attribute_inference(deid_train, train.sites, deid_test, test.sites, all_draws, seed)
    else:
        inference["not_measured"] = "the test images carry no site of origin shared with the training images"

    classifier = train_classifier(train, cfg, input_size=cfg.eval.classifier_size,
                                  epochs=cfg.eval.classifier_epochs, progress=progress)
    device = resolve_device(cfg.train.device)

    def scorer(net: torch.nn.Module, images: np.ndarray) -> np.ndarray:
        return torch.sigmoid(batched(net.eval(), as_tensor(images), device)).numpy()

    names = cfg_findings(cfg)
    utility = {"before": finding_utility(test.labels, scorer(classifier, test.images), names, all_draws),
               "after": finding_utility(test.labels, scorer(classifier, deid_test), names, all_draws)}
    return {
        "level": level,
        "attackers": {n: attackers[n] for n in worst_first},
        "worst_case": worst,
        "worst_attacker": worst_first[0],
        "chance_p_at_1": next(iter(attackers.values()))["after"]["chance_p_at_1"],
        "inference": inference,
        "utility": utility,
        "quality": quality(deid_test, test.images, all_draws),
        "bootstrap": {"samples": bootstrap, "unit": "patient", "seed": seed, "interval": "95 % percentile"},
        "data": {"test_patients": int(len(np.unique(test.patient_ids))), "test_images": int(len(test)),
                 "queries": int(len(q)), "gallery": int(len(g)), "train_images": int(len(train)),
                 "source": str(cfg.data.source) if str(cfg.data.source) == "synthetic" else "site data (labels file)"},
    }
