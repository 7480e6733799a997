"""The server's strategy: Flower's FedAvg / FedProx plus what fedeid needs around them.

* **Aggregation.** FedAvg weighted by ``num-examples`` (Flower's ``aggregate_arrayrecords``), or
  FedProx (Flower's, which sends ``proximal-mu`` to the clients; they add the proximal term
  inside :func:`fedeid.train.train_deid`).
* **Contract.** Every reply is checked with :func:`fedeid.federated.arrays.reply_problems`:
  exactly the decoupler/decoder arrays (names and shapes of the global model) and scalar
  metrics. A reply that breaks it is dropped and counted as a failure.
* **Drop-outs.** Error replies and replies that never arrive (the round's ``timeout``) are left
  out; the round is aggregated from the valid replies if there are at least ``min_replies``,
  otherwise the global model is kept unchanged and the round is recorded as skipped.
* **Central DP** (``privacy.mode = "central"``). Flower's
  ``DifferentialPrivacyServerSideFixedClipping`` refuses to aggregate a round with any failed
  reply and fixes the noise to a configured client count, so it does not fit drop-out
  tolerance; the same mechanism is applied here with Flower's own clipping primitive
  (``compute_clip_model_update``) and noise drawn from OS entropy: each update is clipped to
  L2 norm ``C`` relative to the current global model, the clipped models are averaged with
  equal weights over the ``m`` valid replies (example-count weights would give a site more
  than ``C`` of influence), and Gaussian noise of std ``z·C/m`` is added — i.e. ``N(0,(zC)²)``
  on the sum of updates. Each aggregated round is composed in a
  :class:`fedeid.privacy.accountant.CentralAccountant` (Opacus RDP) at sampling rate
  ``sampled / available``; ε at ``privacy.delta`` is reported every round.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.differential_privacy import compute_clip_model_update

from fedeid.config import Config
from fedeid.federated.arrays import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY, Spec, record_nbytes, reply_problems
from fedeid.privacy.accountant import CentralAccountant

log = logging.getLogger("fedeid.federated")


class _FedeidMixin:
    """Validation, drop-out tolerance, central DP and per-round bookkeeping over a Flower FedAvg."""

    expected: Spec | None
    min_replies: int
    dp: CentralAccountant | None
    clipping_norm: float
    noise_rng: np.random.Generator
    round_info: dict[int, dict[str, Any]]

    def _init_fedeid(self, expected: Spec | None, min_replies: int, accountant: CentralAccountant | None,
                     clipping_norm: float) -> None:
        self.expected = expected
        self.min_replies = max(1, int(min_replies))
        self.dp = accountant
        self.clipping_norm = float(clipping_norm)
        self.noise_rng = np.random.default_rng(secrets.randbits(128))
        self.round_info = {}
        self._current: dict[int, ArrayRecord] = {}

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        available = len(list(grid.get_node_ids()))
        self._current[server_round] = arrays
        self.round_info[server_round] = {
            "round": server_round,
            "sampled": len(messages),
            "available": available,
            "bytes_down": record_nbytes(arrays) * len(messages),
            "array_bytes": record_nbytes(arrays),
            "t_configured": time.time(),
        }
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        info = self.round_info.setdefault(server_round, {"round": server_round, "sampled": len(replies)})
        valid, clients, rejected = [], [], []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                rejected.append({"node": node, "reason": f"error: {msg.error.reason}"[:300]})
                continue
            problems = reply_problems(msg.content, self.expected, train=True)
            if problems:
                rejected.append({"node": node, "reason": "; ".join(problems)[:300]})
                log.warning("round %d: dropping reply of node %d: %s", server_round, node, problems)
                continue
            valid.append(msg)
            clients.append({"node": node, **dict(msg.content[METRICS_KEY])})
        info.update(replies=len(replies), valid=len(valid), failures=info.get("sampled", len(replies)) - len(valid),
                    rejected=rejected, clients=clients,
                    bytes_up=sum(record_nbytes(m.content[ARRAYS_KEY]) for m in valid))
        if len(valid) < self.min_replies:
            log.warning("round %d: %d valid replies < min %d: global model kept", server_round, len(valid),
                        self.min_replies)
            info["aggregated"] = False
            return None, None
        info["aggregated"] = True
        if self.dp is None:
            contents = [m.content for m in valid]
            return aggregate_arrayrecords(contents, WEIGHT_KEY), weighted_metrics(valid)
        return self._aggregate_central_dp(server_round, valid, info)

    def _aggregate_central_dp(self, server_round: int, valid: list[Message], info: dict[str, Any]
                              ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.dp is not None
        current = self._current[server_round]
        names = list(current.keys())
        base = [a.numpy().astype(np.float64) for a in current.values()]
        total = [np.zeros_like(b) for b in base]
        pre_norms = []
        for msg in valid:
            rec = msg.content[ARRAYS_KEY]
            upd = [rec[k].numpy().astype(np.float64) for k in names]
            pre_norms.append(float(np.sqrt(sum(float(np.sum((u - b) ** 2)) for u, b in zip(upd, base)))))
            with np.errstate(divide="ignore", invalid="ignore"):  # a zero update has norm 0
                compute_clip_model_update(upd, base, self.clipping_norm)  # in place: base + clipped delta
            for t, u, b in zip(total, upd, base):
                t += u - b
        m = len(valid)
        noise_std = self.dp.noise_multiplier * self.clipping_norm / m
        mean_delta = [t / m for t in total]
        for d in mean_delta:  # fresh OS entropy: never the global, possibly seeded, numpy RNG
            d += self.noise_rng.normal(0.0, noise_std, d.shape)
        new = ArrayRecord({k: Array(np.asarray(b + d, dtype=current[k].numpy().dtype))
                           for k, b, d in zip(names, base, mean_delta)})
        q = min(1.0, info.get("sampled", m) / max(1, info.get("available", m)))
        self.dp.step(sample_rate=q)
        info["central_dp"] = {
            "noise_std": noise_std, "clipping_norm": self.clipping_norm,
            "noise_multiplier": self.dp.noise_multiplier, "sample_rate": q,
            "update_norms": pre_norms, "clipped_fraction": float(np.mean([n > self.clipping_norm for n in pre_norms])),
            "epsilon": self.dp.epsilon(), "delta": self.dp.delta, "releases": self.dp.rounds,
        }
        return new, weighted_metrics(valid, equal=True)  # equal weights, as the arrays

    # --------------------------------------------------------------- evaluate
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = []
        for msg in replies:
            if msg.has_error() or reply_problems(msg.content, None, train=False):
                continue
            valid.append(msg)
        info = self.round_info.setdefault(server_round, {"round": server_round})
        info["evaluate_clients"] = [{"node": int(m.metadata.src_node_id), **dict(m.content[METRICS_KEY])}
                                    for m in valid]
        return weighted_metrics(valid) if valid else None


def weighted_metrics(replies: list[Message], equal: bool = False) -> MetricRecord:
    """Mean of every scalar metric over the replies that report it, weighted by ``num-examples``.

    (Flower's ``aggregate_metricrecords`` requires identical keys in every reply; a site may
    lack one, e.g. a finding AUC when its data hold one class only.)
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for msg in replies:
        rec = msg.content[METRICS_KEY]
        w = 1.0 if equal else float(rec.get(WEIGHT_KEY, 1.0))  # type: ignore[arg-type]
        for k, v in rec.items():
            if k == WEIGHT_KEY or not isinstance(v, (int, float)):
                continue
            sums[k] = sums.get(k, 0.0) + w * float(v)
            weights[k] = weights.get(k, 0.0) + w
    return MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})


class FedeidFedAvg(_FedeidMixin, FedAvg):
    pass


class FedeidFedProx(_FedeidMixin, FedProx):
    pass


def make_strategy(cfg: Config, expected: Spec | None, *, min_replies: int = 1,
                  accountant: CentralAccountant | None = None, evaluate: bool = True) -> FedAvg:
    """The strategy ``cfg.fed`` / ``cfg.privacy`` ask for (see the module docstring)."""
    f = cfg.fed
    if not 0 < f.fraction_train <= 1:
        raise ValueError(f"fed.fraction_train must be in (0, 1], got {f.fraction_train}")
    common = dict(fraction_train=f.fraction_train, fraction_evaluate=1.0 if evaluate else 0.0,
                  min_train_nodes=f.min_clients, min_evaluate_nodes=f.min_clients if evaluate else 0,
                  min_available_nodes=f.min_clients, weighted_by_key=WEIGHT_KEY,
                  arrayrecord_key=ARRAYS_KEY, configrecord_key="config")
    if cfg.privacy.mode == "central" and accountant is None:
        accountant = CentralAccountant(cfg.privacy.noise_multiplier, cfg.privacy.delta)
    if cfg.privacy.mode != "central":
        accountant = None
    if cfg.privacy.mode not in ("none", "central", "local"):
        raise ValueError(f"privacy.mode must be none, central or local, got {cfg.privacy.mode!r}")
    strategy: FedAvg
    if f.strategy == "fedavg":
        strategy = FedeidFedAvg(**common)
    elif f.strategy == "fedprox":
        strategy = FedeidFedProx(**common, proximal_mu=f.proximal_mu)
    else:
        raise ValueError(f"fed.strategy must be fedavg or fedprox, got {f.strategy!r}")
    strategy._init_fedeid(expected, min_replies, accountant, cfg.privacy.clipping_norm)  # type: ignore[attr-defined]
    return strategy
