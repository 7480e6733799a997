"""What a privacy level means, in measured terms, stored with the model that it describes.

``level`` is the fraction of patches blocked; by itself it says nothing about privacy. The
calibration table says what it bought on held-out patients: the worst-case P@1 over the attacker
suite (and which attacker reached it) at each evaluated level, beside chance. It is computed by
the evaluation (:func:`calibration_from_results`: the fedeid rows of an evaluation's results) or
on its own (:func:`calibrate`), saved in the checkpoint's ``extra["calibration"]`` and read back
by ``fedeid deid`` (:func:`describe_level`). A checkpoint is an input like any other: the table
read from it is checked before it is believed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedeid.config import Config
from fedeid.data.imageset import ImageSet
from fedeid.deid.pipeline import DeIdentifier
from fedeid.eval.attackers import AttackSuite


def calibrate(deidentifier: DeIdentifier, train: ImageSet, held_out: ImageSet, cfg: Config,
              levels: tuple[float, ...] | None = None, progress: bool = False) -> dict[str, Any]:
    """Worst-case P@1 of ``deidentifier`` at each level on ``held_out`` patients (never trained on).

    The attacker suite is fitted on ``train`` (plus the held-out gallery originals, as in the
    evaluation); ``held_out`` must hold at least two images of each of its patients.
    """
    suite = AttackSuite(train, held_out, cfg, progress=progress)
    levels = tuple(cfg.eval.levels if levels is None else levels)
    rows = [suite.score(lambda im, lv: deidentifier.deidentify(im, lv)[0], lv)["worst_case"] for lv in levels]
    return {
        "levels": [float(lv) for lv in levels],
        "worst_p_at_1": [r["p_at_1"] for r in rows],
        "worst_attacker": [r["attacker"] for r in rows],
        "chance_p_at_1": rows[0]["chance_p_at_1"],
        "attackers": list(suite.names),
        "n_patients": int(len(np.unique(held_out.patient_ids))),
        "n_queries": int(len(suite.queries)),
    }


def calibration_from_results(results: dict[str, Any], method: str = "fedeid") -> dict[str, Any]:
    """The same table from an evaluation's results (no extra measurement)."""
    m, ref = results["methods"][method], results["reference"]
    return {
        "levels": [float(lv) for lv in m["levels"]],
        "worst_p_at_1": list(m["worst_p_at_1"]),
        "worst_attacker": list(m["worst_attacker"]),
        "chance_p_at_1": ref["chance_p_at_1"],
        "attackers": list(results.get("attackers", [])),
        "n_patients": ref["n_test_patients"],
        "n_queries": ref["n_queries"],
    }


def _checked(table: Any) -> tuple[np.ndarray, np.ndarray, list[str], float, int]:
    """The table's values, or ValueError saying what is wrong with it."""
    if not isinstance(table, dict):
        raise ValueError("calibration is not a table")
    try:
        levels = np.asarray(table["levels"], dtype=float)
        p1 = np.asarray(table["worst_p_at_1"], dtype=float)
        who = [str(a) for a in table["worst_attacker"]]
        chance = float(table["chance_p_at_1"])
        n = int(table["n_patients"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"calibration table is malformed ({exc})") from exc
    if levels.ndim != 1 or not len(levels) or p1.shape != levels.shape or len(who) != len(levels):
        raise ValueError("calibration table's columns differ in length")
    if not (np.isfinite(levels).all() and np.isfinite(p1).all() and math.isfinite(chance)):
        raise ValueError("calibration table holds non-finite values")
    if (levels < 0).any() or (levels > 1).any() or (np.diff(levels) <= 0).any():
        raise ValueError("calibration levels must rise within [0, 1]")
    if (p1 < 0).any() or (p1 > 1).any() or not 0 < chance <= 1 or n < 1:
        raise ValueError("calibration figures out of range")
    return levels, p1, who, chance, n


def upper_bound(p_at_1: float, n_patients: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a P@1 measured on ``n_patients``.

    Why: on the 30 patients of the quick benchmark a measured 0.083 cannot exclude 0.22, and a
    user choosing a level should see that. The patient is the unit (a patient's queries are not
    independent draws), so the bound is wider than one over queries would be.
    """
    from scipy.stats import beta

    k = p_at_1 * n_patients
    return 1.0 if k >= n_patients else float(beta.ppf(confidence, k + 1, n_patients - k))


def describe_level(table: Any, level: float) -> str:
    """One line on what ``level`` bought when this model was calibrated (``table`` None: none was).

    At a calibrated level the measured figure with its 95 % upper bound; between two, both
    neighbours (the figure between them was not measured, so none is invented); outside the
    table, the nearest with that said.
    """
    if table is None:
        return (f"level {level:g}: this model carries no calibration (`fedeid evaluate` writes a calibrated "
                f"checkpoint); the level alone is the fraction of patches replaced, not a privacy figure")
    levels, p1, who, chance, n = _checked(table)
    tail = f"(chance {chance:.3f}; {n} held-out patients)"

    def at(i: int) -> str:
        return (f"worst-case P@1 {p1[i]:.3f} at level {levels[i]:g} (95 % upper bound "
                f"{upper_bound(float(p1[i]), n):.3f}; strongest attacker: {who[i]})")

    exact = np.flatnonzero(np.isclose(levels, level, atol=1e-9))
    if len(exact):
        return f"level {level:g}: re-identification measured at calibration: {at(int(exact[0]))} {tail}"
    above = np.flatnonzero(levels > level)
    below = np.flatnonzero(levels < level)
    if len(above) and len(below):
        return (f"level {level:g}: not calibrated itself; between {at(int(below[-1]))} and "
                f"{at(int(above[0]))} {tail}")
    nearest = int(above[0]) if len(above) else int(below[-1])
    return f"level {level:g}: outside the calibrated range; nearest: {at(nearest)} {tail}"
