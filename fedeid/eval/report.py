"""The privacy–utility evaluation of method.md A.5, for fedeid and its baselines in one run.

Protocol (held-out patients never seen by any de-identification network):

* **Gallery / queries.** Each test patient's first half of acquisitions are the original
  gallery; the other half, de-identified, are the queries.
* **Attackers.** The suite of :mod:`fedeid.eval.attackers` — a learned ReID network trained on
  originals of the training patients *and* the gallery (the attacker knows who the gallery images
  are — the threat of linking released images to a hospital's archive), the same network
  fine-tuned on the method's de-identified training images (adaptive), SIFT keypoints with
  RANSAC, visible-patch correlation, foundation-model retrieval (frozen and tuned on
  de-identified training images) and the model holder's like-with-like linkage. Every privacy
  figure is reported per attacker and as the worst case over them (``worst_*``), which the
  acceptance checks, the plot and the summary table use.
* **Utility.** A finding classifier trained on originals of the training patients; macro AUC on
  the de-identified test images, and again after fine-tuning it on de-identified training images.
* **Quality.** SSIM and PSNR of de-identified test images against their originals.

Level 0 leaves a pixel method's images unchanged, so it is evaluated once and shared.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedeid.config import Config
from fedeid.data.imageset import ImageSet
from fedeid.deid.pipeline import DeIdentifier
from fedeid.eval.attackers import TRAINED_PER_LEVEL, AttackSuite, Method
from fedeid.eval.attackers import split_gallery  # noqa: F401  (re-exported: federated clients import it from here)
from fedeid.eval.baselines import BASELINES
from fedeid.eval.grid import grid_sample, write_counterfactual_grid, write_grid
from fedeid.eval.metrics import macro_auc, per_finding_auc, psnr, ssim
from fedeid.eval.plots import pareto_dominance, plot_privacy_utility
from fedeid.io import atomic_write_json
from fedeid.models.deid_model import cfg_findings
from fedeid.progress import Progress
from fedeid.train import classifier_scores, resolve_device, train_classifier

DOMINANCE_TOLERANCE = 0.01  # AUC: below the spread of macro AUC over ~100 test images


def deid_method(deidentifier: DeIdentifier, compensate: bool = True) -> Method:
    return lambda images, level: deidentifier.deidentify(images, level, compensate=compensate)[0]


def baseline_method(name: str, seed: int) -> Method:
    """A baseline as an evaluated method: one random stream seeded once, drawn on by every call.

    Figures repeat run to run, and successive calls draw anew. A stream restarted per call gave
    the model holder's de-identified archive the releases' own noise, position by position, which
    ties image ``i`` of one call to image ``i`` of the other whoever the patients are.
    """
    fn = BASELINES[name]
    rng = np.random.default_rng(seed)
    return lambda images, level: fn(images, level, rng)


class Evaluator:
    """Fits the attacker suite and the utility classifier once, then scores any method at any level."""

    def __init__(self, train: ImageSet, test: ImageSet, cfg: Config, progress: bool = True) -> None:
        self.cfg = cfg
        self.train = train
        self.test = test
        self.progress = progress
        self.device = resolve_device(cfg.train.device)
        self.suite = AttackSuite(train, test, cfg, progress=progress)
        self.gallery, self.queries = self.suite.gallery, self.suite.queries
        e = cfg.eval
        self.classifier = train_classifier(train, cfg, input_size=e.classifier_size,
                                           epochs=e.classifier_epochs, progress=progress)

    def score(self, method: Method, level: float, adaptive: bool = True) -> dict[str, Any]:
        """Every figure of one method at one level.

        Without ``adaptive`` the attackers that retrain on the method's de-identified training
        images (and the retrained classifier) are left out, and so from the worst case.
        """
        t0 = time.perf_counter()
        deid_test = method(self.test.images, level)
        seconds = time.perf_counter() - t0
        deid_train = method(self.train.images, level) if adaptive else None
        names = None if adaptive else tuple(n for n in self.suite.names if n not in TRAINED_PER_LEVEL)
        attacks = self.suite.score(method, level, deid_test, deid_train, attackers=names)
        worst = attacks.pop("worst_case")
        scores = classifier_scores(self.classifier, deid_test, self.device)
        row: dict[str, Any] = {
            "worst_p_at_1": worst["p_at_1"],
            "worst_map_at_r": worst["map_at_r"],
            "worst_verification_auc": worst["verification_auc"],
            "worst_attacker": worst["attacker"],
            "chance_p_at_1": worst["chance_p_at_1"],
            "utility_auc": macro_auc(self.test.labels, scores),
            # which finding a method loses is the first thing to ask when the macro AUC drops
            "utility_auc_by_finding": per_finding_auc(self.test.labels, scores, cfg_findings(self.cfg)),
            "ssim": ssim(deid_test, self.test.images),
            "psnr": psnr(deid_test, self.test.images) if not np.array_equal(deid_test, self.test.images) else None,
            "deid_images_per_s": len(deid_test) / max(seconds, 1e-9),
            "attacks": attacks,
        }
        # the single learned and adaptive attackers' figures under their historical keys
        for prefix, name in (("", "learned"), ("adaptive_", "adaptive")):
            if name in attacks:
                row.update({f"{prefix}{k}": attacks[name][k] for k in ("p_at_1", "map_at_r", "verification_auc")})
        if deid_train is not None:
            classifier = train_classifier(self.train.with_images(deid_train), self.cfg,
                                          input_size=self.cfg.eval.classifier_size,
                                          epochs=self.cfg.eval.adaptive_epochs, init=copy.deepcopy(self.classifier))
            row["utility_auc_retrained"] = macro_auc(self.test.labels, classifier_scores(classifier, deid_test, self.device))
        return row

    def write_grid(self, methods: dict[str, Method], path: str | Path, n_patients: int = 3) -> None:
        """The picture grid (:mod:`fedeid.eval.grid`) of ``methods`` on a few held-out query images."""
        pick = grid_sample(self.test.patient_ids, self.queries, n_patients)
        write_grid(self.test.images[pick], methods, path)

    def write_counterfactual_grid(self, deidentifier: Any, path: str | Path, n_patients: int = 3) -> None:
        """Method B's counterfactuals (each finding set to 0 and 1) on the same held-out images."""
        pick = grid_sample(self.test.patient_ids, self.queries, n_patients)
        write_counterfactual_grid(self.test.images[pick], deidentifier.counterfactual, self.test.finding_names, path)

    def run(self, methods: dict[str, Method], levels: tuple[float, ...]) -> dict[str, Any]:
        """Score every method at every level.

        A method that leaves the images unchanged at level 0 (every pixel method does) shares
        one level-0 row: its figures are those of the originals. One that changes them there
        (a decoder that re-synthesises visible regions too) is scored on its own.
        """
        shared_zero: dict[str, Any] | None = None
        out: dict[str, dict[str, Any]] = {}
        bar = Progress(len(methods) * len(levels), "evaluate", "point", enabled=self.progress)
        for name, method in methods.items():
            rows = []
            for level in levels:
                unchanged = level == 0 and np.array_equal(method(self.test.images, level), self.test.images)
                if unchanged and shared_zero is not None:
                    row = copy.deepcopy(shared_zero)
                else:
                    row = self.score(method, level)
                    if unchanged:
                        shared_zero = copy.deepcopy(row)
                rows.append(row)
                bar.update(status=f"{name} at level {level:g}")
            out[name] = _by_level(levels, rows)
        bar.close()
        reference = shared_zero or self.score(lambda im, lv: im, 0.0)
        return {
            "methods": out,
            "attackers": list(reference["attacks"]),
            "reference": {
                "p_at_1_original": reference.get("p_at_1"),
                "worst_p_at_1_original": reference["worst_p_at_1"],
                "worst_attacker_original": reference["worst_attacker"],
                "utility_auc_original": reference["utility_auc"],
                "utility_auc_by_finding_original": reference["utility_auc_by_finding"],
                "chance_p_at_1": reference["chance_p_at_1"],
                "n_test_patients": int(len(np.unique(self.test.patient_ids))),
                "n_queries": int(len(self.queries)),
            },
        }


def _by_level(levels: tuple[float, ...], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows (one per level) -> per-key lists; ``attacks`` -> {attacker: {figure: [per level]}}."""
    entry: dict[str, Any] = {"levels": list(levels)}
    entry.update({k: [r[k] for r in rows] for k in rows[0] if k != "attacks"})
    entry["attacks"] = {a: {k: [r["attacks"][a][k] for r in rows] for k in figures}
                        for a, figures in rows[0]["attacks"].items()}
    return entry


def acceptance(results: dict[str, Any], method: str = "fedeid") -> dict[str, Any]:
    """The issue's targets, computed (never asserted) from the worst-case figures.

    Privacy is the worst-case P@1 over the attacker suite; dominance is judged on that axis, and
    once more per attacker (``dominates_by_attacker``: a baseline may lose to fedeid under the
    worst case but win under one attacker, which a reader should see).
    """
    m = results["methods"][method]
    ref = results["reference"]
    p1 = np.asarray(m["worst_p_at_1"], dtype=float)
    levels = np.asarray(m["levels"], dtype=float)
    auc = np.asarray(m["utility_auc"], dtype=float)
    # P@1 and chance are ratios of small counts (9/180 vs 3 * 1/60): compare with a tolerance, or
    # a level exactly at three times chance fails on the last bit of a float
    private = np.flatnonzero(p1 <= 3 * ref["chance_p_at_1"] + 1e-9)
    at = int(private[0]) if len(private) else None
    # Points any method reaches for free: release the originals, or release nothing (AUC 0.5).
    free = [(ref["chance_p_at_1"], 0.5), (ref["worst_p_at_1_original"], ref["utility_auc_original"])]

    def dominance(privacy: Callable[[dict[str, Any]], list[float]]) -> dict[str, Any]:
        curve = list(zip(privacy(m), m["utility_auc"]))
        return {name: pareto_dominance(curve, list(zip(privacy(other), other["utility_auc"])),
                                       utility_tol=DOMINANCE_TOLERANCE, trivial_points=free)
                for name, other in results["methods"].items() if name != method}

    by_attacker = {a: {name: d["dominates"] for name, d in
                       dominance(lambda e, a=a: e["attacks"][a]["p_at_1"]).items()}
                   for a in m.get("attacks", {})}
    level0 = p1[levels == 0]
    return {
        "worst_p_at_1_level0": float(level0[0]) if len(level0) else None,
        "worst_p_at_1_level0_ge_0.95": bool((level0 >= 0.95).all()) if len(level0) else None,
        "worst_p_at_1_monotone_non_increasing": bool(np.all(np.diff(p1) <= 1e-9)),
        "first_level_worst_p_at_1_le_3x_chance": float(levels[at]) if at is not None else None,
        "utility_ratio_there": float(auc[at] / ref["utility_auc_original"]) if at is not None else None,
        "utility_ratio_ge_0.9": bool(auc[at] / ref["utility_auc_original"] >= 0.9) if at is not None else None,
        "dominates": dominance(lambda e: e["worst_p_at_1"]),
        "dominates_by_attacker": by_attacker,
    }


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``results.json`` and ``privacy_utility.png`` in ``out_dir`` (both written atomically)."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "results.json", "png": out_dir / "privacy_utility.png"}
    atomic_write_json(paths["json"], results)
    plot_privacy_utility(results, paths["png"])
    return paths


def summary_table(results: dict[str, Any]) -> str:
    """A Markdown table per method and level: worst-case P@1 and its attacker, each attacker's P@1,
    worst-case verification AUC, utility AUC (and retrained), SSIM."""
    attackers = list(results.get("attackers") or next(iter(results["methods"].values()))["attacks"])
    head = ["method", "level", "worst P@1", "by", *attackers, "worst verif. AUC", "utility AUC",
            "retrained AUC", "SSIM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v: Any) -> str:
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    for name, m in results["methods"].items():
        n = len(m["levels"])
        for i, level in enumerate(m["levels"]):
            def at(key: str) -> Any:
                return m.get(key, [None] * n)[i]
            per = [f(m["attacks"][a]["p_at_1"][i]) if a in m["attacks"] else "—" for a in attackers]
            lines.append("| " + " | ".join([name, f"{level:.1f}", f(at("worst_p_at_1")), str(at("worst_attacker")),
                                            *per, f(at("worst_verification_auc")), f(at("utility_auc")),
                                            f(at("utility_auc_retrained")), f(at("ssim"))]) + " |")
    return "\n".join(lines)
