"""The privacy–utility figure and the "on or above the curve" check (method.md, A.5).

Privacy is the worst-case re-identification P@1 over the attacker suite (lower is more private), utility the downstream
classifier's macro AUC on de-identified images (higher is better). A method is better than a
baseline when its curve lies on or above the baseline's: at every privacy the baseline reaches,
it keeps at least as much utility (:func:`pareto_dominance`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from fedeid.io import atomic_save  # noqa: E402

_REQUIRED = ("levels", "worst_p_at_1", "utility_auc", "ssim")
_OPTIONAL = ("worst_verification_auc", "utility_auc_retrained")


def _series(method: str, entry: dict[str, Any], key: str, n: int) -> np.ndarray:
    """One per-level series as floats (``None`` → nan, drawn as a gap), its length checked."""
    values = np.asarray([math.nan if v is None else v for v in entry[key]], dtype=float)
    if len(values) != n:
        raise ValueError(f"method {method!r}: {key} has {len(values)} values for {n} levels")
    return values


def plot_privacy_utility(results: dict[str, Any], path: str | os.PathLike[str], dpi: int = 150,
                         focus: str = "fedeid") -> None:
    """Draw the privacy–utility figure of ``results`` and save it as PNG at ``path`` (atomically).

    ``results`` = ``{"methods": {name: {"levels", "worst_p_at_1", "utility_auc", "ssim", optional
    "worst_verification_auc", "utility_auc_retrained", "attacks": {attacker: {"p_at_1": [...]}}}},
    "reference": {"worst_p_at_1_original", "utility_auc_original", "chance_p_at_1"}}``, every
    series one value per level. Privacy is always the worst case over the attacker suite; the
    per-attacker figures stand beside it. Panels:

    (a) utility AUC against worst-case P@1, one line per method through its levels, each point
        labelled with its level. Chance P@1 is a dashed vertical line, the original images' AUC a
        horizontal one — the ideal de-identifier sits at their top-left corner.
    (b) worst-case P@1 against level, every method, with chance and the originals' worst case.
    (c) each attacker's P@1 against level for ``focus`` (the first method if absent), the worst
        case drawn thick: which attacker sets the figure where.
    (d) worst-case verification AUC against level.
    (e) utility AUC against level (dotted: classifier retrained on de-identified images).
    (f) SSIM against level — how much of the image survives.
    """
    methods = results["methods"]
    ref = results["reference"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    ax_pu, ax_p, ax_att, ax_v, ax_u, ax_q = axes.ravel()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, entry) in enumerate(methods.items()):
        missing = [k for k in _REQUIRED if k not in entry]
        if missing:
            raise ValueError(f"method {name!r} lacks {missing}")
        levels = np.asarray(entry["levels"], dtype=float)
        series = {k: _series(name, entry, k, len(levels)) for k in _REQUIRED[1:] + _OPTIONAL if k in entry}
        c = colours[i % len(colours)]
        ax_pu.plot(series["worst_p_at_1"], series["utility_auc"], "o-", color=c, label=name)
        for lv, x, y in zip(levels, series["worst_p_at_1"], series["utility_auc"]):
            if np.isfinite(x) and np.isfinite(y):
                ax_pu.annotate(f"{lv:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
        ax_p.plot(levels, series["worst_p_at_1"], "o-", color=c, label=name)
        ax_u.plot(levels, series["utility_auc"], "o-", color=c, label=name)
        ax_q.plot(levels, series["ssim"], "o-", color=c, label=name)
        if "worst_verification_auc" in series:
            ax_v.plot(levels, series["worst_verification_auc"], "o-", color=c, label=name)
        if "utility_auc_retrained" in series:
            ax_u.plot(levels, series["utility_auc_retrained"], "s:", color=c, alpha=0.6,
                      label=f"{name} (retrained classifier)")

    shown = focus if focus in methods else next(iter(methods))
    entry = methods[shown]
    levels = np.asarray(entry["levels"], dtype=float)
    for j, (attacker, figures) in enumerate(entry.get("attacks", {}).items()):
        ax_att.plot(levels, _series(shown, figures, "p_at_1", len(levels)), "o--",
                    color=colours[j % len(colours)], alpha=0.8, label=attacker)
    ax_att.plot(levels, _series(shown, entry, "worst_p_at_1", len(levels)), "k-", lw=2.5, label="worst case")

    chance, p_orig, u_orig = (ref.get("chance_p_at_1"), ref.get("worst_p_at_1_original"),
                              ref.get("utility_auc_original"))
    for ax, vertical in ((ax_pu, True), (ax_p, False), (ax_att, False)):
        if chance is not None:
            line = ax.axvline if vertical else ax.axhline
            line(chance, color="grey", ls="--", lw=1, label=f"chance P@1 ({chance:.3f})")
            line(3 * chance, color="grey", ls=":", lw=1, label="3 x chance")
    if p_orig is not None:
        ax_p.axhline(p_orig, color="black", ls=":", lw=1, label=f"originals, worst case ({p_orig:.3f})")
    if u_orig is not None:
        for ax in (ax_pu, ax_u):
            ax.axhline(u_orig, color="black", ls=":", lw=1, label=f"original AUC ({u_orig:.3f})")

    ax_pu.set(xlabel="worst-case P@1 over the attacker suite (lower = more private)",
              ylabel="utility: macro AUC", title="(a) privacy–utility (labels: level)")
    ax_p.set(xlabel="privacy level", ylabel="worst-case P@1", title="(b) re-identification vs level")
    ax_att.set(xlabel="privacy level", ylabel="P@1", title=f"(c) {shown}: each attacker")
    ax_v.set(xlabel="privacy level", ylabel="worst-case verification AUC", title="(d) verification vs level")
    ax_u.set(xlabel="privacy level", ylabel="macro AUC", title="(e) utility vs level")
    ax_q.set(xlabel="privacy level", ylabel="SSIM to original", title="(f) image similarity vs level")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_save(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def _envelope(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a's curve as vertices sorted by P@1, duplicates of one P@1 merged to their best utility."""
    order = np.lexsort((-points[:, 1], points[:, 0]))
    p, u = points[order, 0], points[order, 1]
    first = np.r_[True, p[1:] != p[:-1]]
    return p[first], u[first]


def _utility_at(p_vertices: np.ndarray, u_vertices: np.ndarray, p: float) -> float:
    """Monotone hull of the piecewise-linear curve at P@1 = ``p`` (``p`` ≥ the smallest vertex).

    ``max(g(p), max{u_i : p_i <= p})``, g the linear interpolation between adjacent vertices
    (held flat beyond the last): the best utility reachable at an attacker P@1 of at most ``p``.
    """
    g = float(np.interp(p, p_vertices, u_vertices))
    return max(g, float(u_vertices[p_vertices <= p].max()))


def pareto_dominance(
    curve_a: Sequence[Sequence[float]],
    curve_b: Sequence[Sequence[float]],
    *,
    utility_tol: float = 0.0,
    p_tol: float = 0.0,
    trivial_points: Sequence[tuple[float, float]] = (),
) -> dict[str, Any]:
    """Does privacy–utility curve a lie on or above curve b? Points are ``(p_at_1, utility)``.

    a's achievable utility at attacker P@1 = p, ``U_a(p)``, is the *monotone hull* of a's points:
    sort them by P@1, interpolate linearly between neighbours (g), and take
    ``U_a(p) = max(g(p), max{u_i : p_i <= p})`` — a point that is both more private and more
    useful also serves every less private target. Above a's largest P@1, ``U_a`` is a's best
    utility; below a's smallest P@1, a has shown no operating point, so ``U_a`` is undefined.

    Every point ``(p_b, u_b)`` of b is checked at ``p = p_b + p_tol`` (``p_tol`` grants a that
    much more attacker P@1, for measurement noise): its margin is ``U_a(p) - u_b`` and it passes
    when ``margin >= -utility_tol``. When ``p`` is below a's smallest P@1 the point is
    *uncovered* and fails: b reached a privacy a did not, which no extrapolation of a may excuse.

    ``trivial_points`` are added to a's points: operating points every method has for free, so a
    baseline must not win on them. Pass ``(chance_p_at_1, 0.5)`` (discard the image: a baseline
    reaching chance privacy only by destroying all utility does not count against a) and
    ``(p_at_1_original, utility_auc_original)`` (release the original: an image baseline's
    level 0 *is* the original, which a reconstructing de-identifier matches only up to its
    reconstruction error). Non-finite points of either curve are skipped and counted.

    Returns ``{"dominates": bool, "verdict": str, "min_margin": float (nan if no covered point),
    "n_failed": int, "n_uncovered": int, "n_skipped": int, "utility_tol", "p_tol",
    "points": [{"p_at_1", "utility", "a_utility" (None if uncovered), "margin" (None if
    uncovered), "covered", "ok"}]}``.
    """
    a = np.asarray(curve_a, dtype=float).reshape(-1, 2)
    b = np.asarray(curve_b, dtype=float).reshape(-1, 2)
    if len(trivial_points):
        a = np.vstack([a, np.asarray(trivial_points, dtype=float).reshape(-1, 2)])
    a_ok, b_ok = np.isfinite(a).all(1), np.isfinite(b).all(1)
    n_skipped = int((~a_ok).sum() + (~b_ok).sum())
    a, b = a[a_ok], b[b_ok]
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both curves need at least one finite (p_at_1, utility) point")
    p_vertices, u_vertices = _envelope(a)

    points: list[dict[str, Any]] = []
    for p_b, u_b in b:
        p = p_b + p_tol
        covered = bool(p >= p_vertices[0])
        a_u = _utility_at(p_vertices, u_vertices, p) if covered else None
        margin = a_u - u_b if a_u is not None else None
        ok = margin is not None and margin >= -utility_tol
        points.append({"p_at_1": float(p_b), "utility": float(u_b), "a_utility": a_u, "margin": margin,
                       "covered": covered, "ok": bool(ok)})

    margins = [pt["margin"] for pt in points if pt["margin"] is not None]
    n_failed = sum(not pt["ok"] for pt in points)
    n_uncovered = sum(not pt["covered"] for pt in points)
    if n_failed == 0:
        verdict = "a on or above b"
    else:
        verdict = (f"a below b at {n_failed} of {len(points)} points"
                   f" ({n_uncovered} more private than any point of a)")
    return {
        "dominates": n_failed == 0,
        "verdict": verdict,
        "min_margin": float(min(margins)) if margins else math.nan,
        "n_failed": n_failed,
        "n_uncovered": n_uncovered,
        "n_skipped": n_skipped,
        "utility_tol": utility_tol,
        "p_tol": p_tol,
        "points": points,
    }
