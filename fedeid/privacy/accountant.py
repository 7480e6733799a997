"""Privacy accounting for both DP modes, on Opacus' RDP accountant.

*Central DP* (``privacy.mode = "central"``): every round the server clips each client's update
(its difference to the current global model) to L2 norm ``C`` and adds ``N(0, (z·C)²)`` to the
*sum* of the clipped updates before dividing by the number of replies (DP-FedAvg, McMahan et
al. 2018; the same mechanism as Flower's ``DifferentialPrivacyServerSideFixedClipping``). With
add/remove-one-client adjacency the sum has sensitivity ``C``, so a round is one Gaussian
mechanism with noise multiplier ``z``, sub-sampled at rate ``q = sampled / available`` clients.
:class:`CentralAccountant` composes rounds with the RDP accountant and reports (ε, δ) — a
*client-level* guarantee: it covers everything one hospital contributes.

*Local DP* (``privacy.mode = "local"``): Opacus DP-SGD inside each client; its accountant
history is kept across rounds on the node (:mod:`fedeid.privacy.local`). The guarantee is
*sample-level* for that site's images, and holds against the server and everyone else.

Histories are plain lists of ``(noise_multiplier, sample_rate, steps)`` so they go into
checkpoints, JSON and Flower records unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

History = list[tuple[float, float, int]]


def history_from_flat(values: Iterable[float]) -> History:
    """Inverse of :func:`history_to_flat` (Flower records hold flat float lists, not tuples)."""
    v = list(values)
    if len(v) % 3:
        raise ValueError(f"accountant history has {len(v)} numbers, not a multiple of 3")
    return [(float(v[i]), float(v[i + 1]), int(round(v[i + 2]))) for i in range(0, len(v), 3)]


def history_to_flat(history: History) -> list[float]:
    return [float(x) for step in history for x in step]


def epsilon_of(history: History, delta: float) -> float:
    """ε spent by a composition history at ``delta`` (0 for an empty history, inf without noise)."""
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]  # type: ignore[misc]
    return float(acc.get_epsilon(delta=delta))


class CentralAccountant:
    """Rounds of the central Gaussian mechanism, composed with RDP."""

    def __init__(self, noise_multiplier: float, delta: float, history: History | None = None) -> None:
        if noise_multiplier < 0:
            raise ValueError("privacy.noise_multiplier must be >= 0")
        if not 0 < delta < 1:
            raise ValueError("privacy.delta must be in (0, 1)")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.acc = RDPAccountant()
        self.acc.history = [tuple(h) for h in (history or [])]  # type: ignore[misc]

    def step(self, sample_rate: float) -> None:
        """Account one released aggregate (one round); ``sample_rate`` = sampled / available clients."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        self.acc.step(noise_multiplier=self.noise_multiplier, sample_rate=float(sample_rate))

    @property
    def rounds(self) -> int:
        return sum(int(n) for _, _, n in self.acc.history)

    @property
    def history(self) -> History:
        return [(float(z), float(q), int(n)) for z, q, n in self.acc.history]

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta)

    def state_dict(self) -> dict[str, object]:
        return {"noise_multiplier": self.noise_multiplier, "delta": self.delta, "history": self.history}

    @classmethod
    def from_state(cls, state: dict[str, object]) -> CentralAccountant:
        return cls(float(state["noise_multiplier"]), float(state["delta"]),  # type: ignore[arg-type]
                   [tuple(h) for h in state.get("history", [])])  # type: ignore[union-attr, misc]


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends ``target_epsilon`` after ``steps`` compositions (RDP).

    Central DP: ``steps`` = rounds, ``sample_rate`` = fraction of clients per round. Local DP:
    ``steps`` = rounds × local epochs × batches per epoch, ``sample_rate`` = batch / site size.
    """
    if target_epsilon <= 0 or math.isinf(target_epsilon):
        raise ValueError("target epsilon must be finite and > 0")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant="rdp",
                                      epsilon_tolerance=0.01))
