"""Aggregation rules over the sites' updates, on Flower's own robust-aggregation functions.

Every rule works on *updates* (a site's arrays minus the current global model, float64, in the
global model's array order) that already passed :mod:`fedeid.federated.screen`, and returns
the aggregated update. Working on updates rather than on the models themselves changes
nothing for the rules (they are translation-equivariant) and lets central DP clip and noise
the same vectors.

* ``mean`` — FedAvg: weighted mean (``weights`` from the screen; equal under central DP).
* ``trimmed-mean`` — per coordinate, drop the ``trim`` fraction at each tail and average the
  rest (Flower's ``fedtrimmedavg.trim_mean``; Yin et al. 2018).
* ``median`` — coordinate-wise median (what Flower's ``FedMedian`` computes).
* ``krum`` / ``multi-krum`` — keep the update(s) with the smallest summed squared distance to
  their ``n - f - 2`` nearest neighbours (Flower's ``multikrum.select_multikrum``; Blanchard et
  al. 2017); multi-krum keeps ``n - f`` and averages them with their weights.
* ``bulyan`` — multi-krum selection of ``n - 2f``, then per coordinate the mean of the
  ``n - 4f`` values closest to the median (Flower's ``bulyan.aggregate_n_closest_weights``);
  needs ``n >= 4f + 3`` replies.

Flower's strategy classes (``FedMedian``, ``FedTrimmedAvg``, ``Krum``, ``MultiKrum``, ``Bulyan``)
aggregate inside their own ``aggregate_train`` straight from the replies: used as classes, they
would bypass the value checks and central DP, so fedeid calls the functions they are built on.

:func:`sensitivity` is the largest change one site can cause in a rule's output when every
update is clipped to L2 norm ``C`` — what central DP's noise is scaled to.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

RULES = ("mean", "trimmed-mean", "median", "krum", "multi-krum", "bulyan")

Update = list[np.ndarray]


def check_rule(rule: str, trim: float, byzantine: int) -> None:
    if rule not in RULES:
        raise ValueError(f"fed.aggregation must be one of {', '.join(RULES)}, got {rule!r}")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"fed.trim_fraction must be in [0, 0.5), got {trim}")
    if byzantine < 0:
        raise ValueError(f"fed.byzantine must be >= 0, got {byzantine}")


def min_replies(rule: str, byzantine: int) -> int:
    """Fewest updates a rule can aggregate (below it the round keeps the global model)."""
    if rule == "bulyan":
        return 4 * byzantine + 3
    if rule in ("krum", "multi-krum"):
        return byzantine + 1
    return 1


def _krum_selection(updates: list[Update], byzantine: int, keep: int) -> list[int]:
    """Indices Flower's ``select_multikrum`` keeps (it works on RecordDicts: wrap, then map back)."""
    contents = [RecordDict({"arrays": ArrayRecord({str(i): Array(a) for i, a in enumerate(u)})}) for u in updates]
    chosen = select_multikrum(contents, num_malicious_nodes=byzantine, num_nodes_to_select=keep)
    ids = {id(c): i for i, c in enumerate(contents)}
    return [ids[id(c)] for c in chosen]


def aggregate(updates: list[Update], weights: list[float], rule: str, *, trim: float = 0.2,
              byzantine: int = 1) -> tuple[Update, dict[str, Any]]:
    """The aggregated update of ``rule`` and what it decided (``selected`` indices for Krum rules)."""
    n = len(updates)
    if n < min_replies(rule, byzantine):
        raise ValueError(f"{rule} needs at least {min_replies(rule, byzantine)} updates, got {n}")
    info: dict[str, Any] = {"rule": rule}
    if rule == "mean":
        w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        return [sum(wi * u[j] for wi, u in zip(w, updates)) for j in range(len(updates[0]))], info
    if rule == "median":
        return [np.median(np.stack([u[j] for u in updates]), axis=0) for j in range(len(updates[0]))], info
    if rule == "trimmed-mean":
        info["kept_per_coordinate"] = n - 2 * int(trim * n)
        return [trim_mean(np.stack([u[j] for u in updates]), trim) for j in range(len(updates[0]))], info
    if rule in ("krum", "multi-krum"):
        keep = 1 if rule == "krum" else max(1, n - byzantine)
        sel = _krum_selection(updates, byzantine, keep)
        info["selected"] = sel
        return aggregate([updates[i] for i in sel], [weights[i] for i in sel], "mean")[0], info
    # bulyan
    theta = n - 2 * byzantine
    beta = theta - 2 * byzantine
    sel = _krum_selection(updates, byzantine, theta)
    chosen = [updates[i] for i in sel]
    median = [np.median(np.stack([u[j] for u in chosen]), axis=0) for j in range(len(chosen[0]))]
    info["selected"] = sel
    return [np.asarray(a) for a in aggregate_n_closest_weights(median, chosen, beta)], info


def sensitivity(rule: str, m: int, clip: float, *, trim: float = 0.2, byzantine: int = 1) -> float:
    """L2 bound on how far one site moves ``rule``'s output, every update clipped to ``clip``.

    ``mean`` (equal weights): ``C/m`` — DP-FedAvg's add/remove-one bound, the noise on the sum
    being ``N(0, (zC)²)``. For the robust rules a site can also change *which* others are
    trimmed or selected, so they get replace-one bounds: each order statistic of a coordinate
    moves by at most the change of the replaced value, hence trimmed mean ``2C/k`` (``k``
    values kept per coordinate) and median ``2C``; Krum and multi-krum output a (mean of)
    update(s) inside the ``C`` ball, hence ``2C``; Bulyan's output lies per coordinate within
    the range of the ``θ`` selected updates, a vector of norm at most ``√θ·C``, hence ``2√θ·C``.

    Limit: the RDP accountant's sub-sampling amplification (``fed.fraction_train < 1``) is
    derived for add/remove-one adjacency; with a robust rule and sub-sampled sites, read its ε
    as indicative. With every site sampled (the default) the bound above is what it composes.
    """
    if rule == "mean":
        return clip / m
    if rule == "trimmed-mean":
        return 2 * clip / max(1, m - 2 * int(trim * m))
    if rule == "bulyan":
        return 2 * math.sqrt(max(1, m - 2 * byzantine)) * clip
    return 2 * clip
