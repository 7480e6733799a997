"""Value checks on the sites' train replies, before anything is averaged or clipped.

The reply contract (:func:`fedeid.federated.arrays.reply_problems`) checks names, shapes and
dtypes; a hostile site can still send arrays of the right shape holding anything. This screen
checks the *values*:

* **finite** — one NaN or Inf would make every rule's output NaN (and under central DP a NaN
  norm compares false against the clipping bound, switching clipping off);
* **update norm** — the L2 norm of ``reply - global`` must stay within ``fed.max_update_norm``
  (absolute; 0 = none) and within ``fed.update_norm_factor`` × the round's median update norm
  (0 = off). The median is robust only with at least 3 replies and one hostile site. Under
  central DP the relative bound is not applied: whether a site is kept must not depend on the
  others' updates (the DP analysis bounds one site's influence by the clipping norm, which is
  the norm bound there);
* **weights** — ``num-examples`` is the site's own claim. ``fed.weighting = "capped"`` (the
  default) caps each claim at ``fed.max_weight_ratio`` × the round's (lower) median claim and at
  ``fed.max_examples``; ``"equal"`` ignores the claims; ``"claimed"`` trusts them.

What this does not stop: a site that stays within the bounds (a "small but directed" update,
or data hidden in the low bits of a weight array of the right shape and a plausible norm).
The norm bound limits how much such a site moves the model and how many bits of payload it can
carry in a large update; it cannot tell an honest update from a crafted one of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

WEIGHTINGS = ("capped", "equal", "claimed")


@dataclass
class Screened:
    """Indices (into the replies handed in) kept, and why the others were rejected."""

    kept: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (index, kind, reason)
    norms: list[float] = field(default_factory=list)  # update norm of every finite reply (nan otherwise)
    weights: list[float] = field(default_factory=list)  # aggregation weight of each kept reply
    info: dict[str, Any] = field(default_factory=dict)


def update_norm(update: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(u))) for u in update)))


def nonfinite(arrays: dict[str, np.ndarray]) -> list[str]:
    """Names of the arrays holding NaN or Inf."""
    return [k for k, a in arrays.items() if not np.isfinite(a).all()]


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"fed.weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def screen(updates: list[list[np.ndarray] | None], claims: list[float], *, max_norm: float = 0.0,
           norm_factor: float = 0.0, weighting: str = "capped", max_weight_ratio: float = 3.0,
           max_examples: float = 0.0) -> Screened:
    """Keep the updates that pass the value checks; ``None`` marks a reply with non-finite arrays."""
    out = Screened()
    norms = [update_norm(u) if u is not None else float("nan") for u in updates]
    out.norms = norms
    finite = [i for i, u in enumerate(updates) if u is not None]
    for i, u in enumerate(updates):
        if u is None:
            out.rejected.append((i, "non-finite", "arrays hold NaN or Inf"))
    median = float(np.median([norms[i] for i in finite])) if finite else 0.0
    out.info["median_update_norm"] = median
    limit = max_norm if max_norm > 0 else float("inf")
    if norm_factor > 0 and len(finite) >= 3:
        limit = min(limit, norm_factor * median)
    out.info["norm_limit"] = limit if np.isfinite(limit) else None
    for i in finite:
        if norms[i] > limit:
            out.rejected.append((i, "update-norm", f"update norm {norms[i]:.4g} > limit {limit:.4g}"))
        else:
            out.kept.append(i)
    out.weights = weights_for([claims[i] for i in out.kept], weighting, max_weight_ratio, max_examples)
    capped = [i for i, w in zip(out.kept, out.weights) if w < claims[i]]
    if capped:
        out.info["weights_capped"] = capped
    return out


def weights_for(claims: list[float], weighting: str, ratio: float, max_examples: float) -> list[float]:
    """Aggregation weights from the sites' ``num-examples`` claims (see the module docstring)."""
    check_weighting(weighting)
    if weighting == "equal" or not claims:
        return [1.0] * len(claims)
    if weighting == "claimed":
        return [float(c) for c in claims]
    # the lower median: with two sites, a hostile one cannot raise the cap by claiming 1e9
    lower_median = float(np.partition(np.asarray(claims, dtype=np.float64), (len(claims) - 1) // 2)[(len(claims) - 1) // 2])
    cap = ratio * lower_median if ratio > 0 else float("inf")
    if max_examples > 0:
        cap = min(cap, float(max_examples))
    return [min(float(c), cap) for c in claims]
