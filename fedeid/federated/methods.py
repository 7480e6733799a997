"""What a federation trains, per de-identification method (``fed.method``, one of ``METHODS``).

Server and sites read the method from the one :class:`~fedeid.config.Config`, and everything
model-specific in the federated code goes through :func:`federated_method`: which network is
built, which part of it travels, how a site trains it (method A: :func:`fedeid.train.train_deid`;
method B: :func:`fedeid.train_replace.train_replace`; both through the one loop
:func:`fedeid.train.optimise`, both taking the same local-DP hook and FedProx anchor) and how a
site reads findings from it for its local figures. The aggregation, the reply screening, robust
rules, central and local DP and SecAgg+ only ever see arrays and never ask which method made them.

**What travels for method B** is its encoder heads and generator (:func:`replace_state`), as the
decoupler and decoder do for method A. The **identity prior stays at each site**: it is a density
fitted to the site's own patients' identity vectors, its margin is calibrated on their image
pairs, and its bank of synthetic identities was accepted against them. Sending it would ship a
generative model of real identities (a bank that is only *margin*-far from real patients, and a
mixture whose means are averages of a few real patients' vectors), which is exactly what method B
exists to withhold; averaging priors across sites would also mix identity spaces that the shared
encoder only aligns approximately. Each site instead fits its prior to the *global* encoder on its
own images (:func:`fedeid.federated.client.site_prior`) and keeps it beside its ReID network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedeid.config import METHODS, Config
from fedeid.models.deid_model import build_deid_model, load_shared_state, shared_state
from fedeid.models.replace import ReplaceModel, load_replace_state, replace_state


def _train_blocking(*args: Any, **kwargs: Any) -> dict[str, float]:
    from fedeid.train import train_deid

    return train_deid(*args, **kwargs)


def _train_replace(*args: Any, **kwargs: Any) -> dict[str, float]:
    from fedeid.train_replace import train_replace

    return train_replace(*args, **kwargs)


def _blocking_findings(model: Any, x: torch.Tensor) -> torch.Tensor:
    d = model.decoupler
    return d.finding_logits(d(model.encode(x)).mu)


def _replace_findings(model: Any, x: torch.Tensor) -> torch.Tensor:
    return model.finding_logits(model.vectors(x))


@dataclass(frozen=True)
class FederatedMethod:
    name: str
    build: Callable[[Config], nn.Module]  # a fresh model (seeded by the caller)
    shared: Callable[[Any], dict[str, torch.Tensor]]  # the part that travels (copies)
    load: Callable[[Any, dict[str, torch.Tensor]], None]  # load a received shared state
    # (model, reid, data, cfg, epochs, *, private, proximal_mu, global_state) -> scalar metrics
    train: Callable[..., dict[str, float]]
    findings: Callable[[Any, torch.Tensor], torch.Tensor]  # images -> finding logits (local figures)


_METHODS = {
    "blocking": FederatedMethod("blocking", build_deid_model, shared_state, load_shared_state, _train_blocking,
                                _blocking_findings),
    "replace": FederatedMethod("replace", ReplaceModel, replace_state, load_replace_state, _train_replace,
                               _replace_findings),
}


def federated_method(cfg: Config) -> FederatedMethod:
    """The configured method's federated parts; an unknown ``fed.method`` is a ValueError naming the choices."""
    if cfg.fed.method not in METHODS:
        raise ValueError(f"fed.method {cfg.fed.method!r} is not one of {', '.join(METHODS)}")
    return _METHODS[cfg.fed.method]
