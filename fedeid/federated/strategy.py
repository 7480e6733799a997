"""The server's strategy: Flower's FedAvg / FedProx plus what fedeid needs around them.

* **Contract.** Every reply is checked with :func:`fedeid.federated.arrays.reply_problems`:
  exactly the global model's shared arrays (names, shapes, dtypes: decoupler/decoder, or under
  method B encoder heads/generator) and scalar metrics. A reply that breaks it is dropped.
* **Values.** Then :func:`fedeid.federated.screen.screen`: finite arrays, an update-norm bound
  (with or without DP), ``num-examples`` claims capped (or equal weights). Every dropped reply
  is logged with its node, site and reason and counted per kind in the round's ``rejected`` /
  ``rejections`` (``metrics.json``); the round goes on with the others.
* **Aggregation.** ``fed.aggregation`` picks the rule (:mod:`fedeid.federated.robust`: mean =
  FedAvg, trimmed mean, median, Krum, multi-Krum, Bulyan) over the updates (reply − global).
  ``fed.strategy`` = ``fedprox`` is Flower's FedProx, which sends ``proximal-mu`` to the
  clients; they add the proximal term inside :func:`fedeid.train.train_deid`.
* **Drop-outs.** Error replies and replies that never arrive (the round's ``timeout``) are left
  out; the round is aggregated from the kept replies if there are at least ``min_replies`` (and
  as many as the rule needs), otherwise the global model is kept and the round recorded as
  skipped. A site that refuses by its own privacy policy (an error reply starting with
  :data:`fedeid.federated.arrays.REFUSED`) is counted as ``refused``.
* **Central DP** (``privacy.mode = "central"``). Flower's
  ``DifferentialPrivacyServerSideFixedClipping`` refuses to aggregate a round with any failed
  reply and fixes the noise to a configured client count, so it does not fit drop-out
  tolerance; the same mechanism is applied here: each update is clipped to L2 norm ``C`` (a
  zero update is left as it is: no division by its norm), the rule aggregates the clipped
  updates with equal weights (example-count weights would give a site more than ``C`` of
  influence), and Gaussian noise of std ``z · sensitivity`` is added, the sensitivity being the
  rule's (:func:`fedeid.federated.robust.sensitivity`; ``C/m`` for the mean, i.e.
  ``N(0,(zC)²)`` on the sum of updates). Noise is drawn from OS entropy. Each aggregated round
  is composed in a :class:`fedeid.privacy.accountant.CentralAccountant` (Opacus RDP) at
  sampling rate ``sampled / available``; ε at ``privacy.delta`` is reported every round.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from fedeid.config import Config
from fedeid.federated.arrays import (ARRAYS_KEY, METRICS_KEY, REFUSED, WEIGHT_KEY, Spec, record_nbytes,
                                     reply_problems)
from fedeid.federated.robust import aggregate, check_rule, min_replies, sensitivity
from fedeid.federated.screen import check_weighting, nonfinite, screen, update_norm, weights_for
from fedeid.privacy.accountant import CentralAccountant

log = logging.getLogger("fedeid.federated")

class _FedeidMixin:
    """Validation, value checks, robust aggregation, central DP and per-round bookkeeping over a Flower FedAvg."""

    expected: Spec | None
    min_replies: int
    dp: CentralAccountant | None
    clipping_norm: float
    noise_rng: np.random.Generator
    round_info: dict[int, dict[str, Any]]

    def _init_fedeid(self, cfg: Config, expected: Spec | None, min_replies: int,
                     accountant: CentralAccountant | None) -> None:
        f = cfg.fed
        check_rule(f.aggregation, f.trim_fraction, f.byzantine)
        check_weighting(f.weighting)
        self.fed = f
        self.expected = expected
        self.min_replies = max(1, int(min_replies))
        self.dp = accountant
        self.clipping_norm = float(cfg.privacy.clipping_norm)
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
        candidates, rejected = [], []

        def reject(msg: Message, kind: str, reason: str) -> None:
            node = int(msg.metadata.src_node_id)
            site = reported_site(msg)
            rejected.append({"node": node, "site": site, "kind": kind, "reason": reason[:300]})
            log.warning("round %d: dropping reply of node %d (site %s): %s: %s", server_round, node,
                        "?" if site is None else site, kind, reason[:300])

        for msg in replies:
            if msg.has_error():
                reason = str(msg.error.reason)
                reject(msg, "refused" if REFUSED in reason else "error", reason)
                continue
            problems = reply_problems(msg.content, self.expected, train=True)
            if problems:
                reject(msg, "contract", "; ".join(problems))
                continue
            candidates.append(msg)
        current = self._current[server_round]
        names = list(current.keys())
        base = [a.numpy().astype(np.float64) for a in current.values()]
        updates: list[list[np.ndarray] | None] = []
        for msg in candidates:
            rec = msg.content[ARRAYS_KEY]
            arrays = {k: rec[k].numpy() for k in names}
            updates.append(None if nonfinite(arrays) else [arrays[k].astype(np.float64) - b for k, b in zip(names, base)])
        f = self.fed
        dp = self.dp is not None
        checked = screen(updates, [float(m.content[METRICS_KEY][WEIGHT_KEY]) for m in candidates],  # type: ignore[arg-type]
                         max_norm=f.max_update_norm, norm_factor=0.0 if dp else f.update_norm_factor,
                         weighting="equal" if dp else f.weighting, max_weight_ratio=f.max_weight_ratio,
                         max_examples=f.max_examples)
        for i, kind, reason in checked.rejected:
            reject(candidates[i], kind, reason)
        capped = [int(candidates[i].metadata.src_node_id) for i in checked.info.pop("weights_capped", [])]
        if capped:
            checked.info["weights_capped_nodes"] = capped
            log.warning("round %d: num-examples claims of nodes %s capped", server_round, capped)
        valid = [candidates[i] for i in checked.kept]
        kept = [updates[i] for i in checked.kept]
        info.update(replies=len(replies), valid=len(valid), failures=info.get("sampled", len(replies)) - len(valid),
                    rejected=rejected, rejections=dict(Counter(r["kind"] for r in rejected)),
                    clients=[{"node": int(m.metadata.src_node_id), **dict(m.content[METRICS_KEY])} for m in valid],
                    bytes_up=sum(record_nbytes(m.content[ARRAYS_KEY]) for m in valid),
                    screen={**checked.info, "update_norms": [checked.norms[i] for i in checked.kept],
                            "weights": checked.weights})
        need = max(self.min_replies, min_replies(f.aggregation, f.byzantine))
        if len(valid) < need:
            log.warning("round %d: %d valid replies < %d needed: global model kept", server_round, len(valid), need)
            info["aggregated"] = False
            return None, None
        info["aggregated"] = True
        pre_norms = [update_norm(u) for u in kept]  # type: ignore[arg-type]
        if dp:
            kept = [clip(u, n, self.clipping_norm) for u, n in zip(kept, pre_norms)]  # type: ignore[arg-type]
        delta, rule_info = aggregate(kept, checked.weights, f.aggregation,  # type: ignore[arg-type]
                                     trim=f.trim_fraction, byzantine=f.byzantine)
        info["aggregation"] = rule_info
        if dp:
            self._add_noise(delta, len(valid), pre_norms, info)
        new = ArrayRecord({k: Array(np.asarray(b + d, dtype=current[k].numpy().dtype))
                           for k, b, d in zip(names, base, delta)})
        return new, weighted_metrics(valid, checked.weights)

    def _add_noise(self, delta: list[np.ndarray], m: int, pre_norms: list[float], info: dict[str, Any]) -> None:
        """Central DP: Gaussian noise scaled to the rule's sensitivity, one accountant step."""
        assert self.dp is not None
        f = self.fed
        sens = sensitivity(f.aggregation, m, self.clipping_norm, trim=f.trim_fraction, byzantine=f.byzantine)
        noise_std = self.dp.noise_multiplier * sens
        for d in delta:  # fresh OS entropy: never the global, possibly seeded, numpy RNG
            d += self.noise_rng.normal(0.0, noise_std, d.shape)
        q = min(1.0, info.get("sampled", m) / max(1, info.get("available", m)))
        self.dp.step(sample_rate=q)
        info["central_dp"] = {
            "noise_std": noise_std, "sensitivity": sens, "clipping_norm": self.clipping_norm,
            "noise_multiplier": self.dp.noise_multiplier, "sample_rate": q,
            "update_norms": pre_norms, "clipped_fraction": float(np.mean([n > self.clipping_norm for n in pre_norms])),
            "epsilon": self.dp.epsilon(), "delta": self.dp.delta, "releases": self.dp.rounds,
        }

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
        if not valid:
            return None
        f = self.fed
        claims = [float(m.content[METRICS_KEY][WEIGHT_KEY]) for m in valid]  # type: ignore[arg-type]
        return weighted_metrics(valid, weights_for(claims, f.weighting, f.max_weight_ratio, f.max_examples))


def reported_site(msg: Message) -> int | None:
    """The ``site-id`` a reply reports (self-declared: the node id is what the SuperLink vouches for)."""
    if msg.has_error():
        return None
    metrics = msg.content.metric_records.get(METRICS_KEY)
    value = metrics.get("site-id") if metrics is not None else None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) \
        else None


def clip(update: list[np.ndarray], norm: float, bound: float) -> list[np.ndarray]:
    """``update`` scaled to L2 norm at most ``bound``; a zero update is returned as it is.

    (Flower's ``compute_clip_model_update`` divides by the norm: an unchanged model — norm 0 —
    raised ZeroDivisionError, and a NaN norm compared false and skipped clipping.)
    """
    if not np.isfinite(norm):
        raise ValueError("clip: non-finite update norm (the screen must have rejected it)")
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return [u * scale for u in update]


def weighted_metrics(replies: list[Message], weights: list[float]) -> MetricRecord:
    """Mean of every scalar metric over the replies that report it, weighted by ``weights``
    (the screened aggregation weights, never a site's raw ``num-examples`` claim).

    (Flower's ``aggregate_metricrecords`` requires identical keys in every reply; a site may
    lack one, e.g. a finding AUC when its data hold one class only.)
    """
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for msg, w in zip(replies, weights):
        for k, v in msg.content[METRICS_KEY].items():
            if k == WEIGHT_KEY or not isinstance(v, (int, float)):
                continue
            sums[k] = sums.get(k, 0.0) + w * float(v)
            totals[k] = totals.get(k, 0.0) + w
    return MetricRecord({k: sums[k] / totals[k] for k in sums if totals[k] > 0})


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
    if cfg.privacy.mode not in ("none", "central", "local"):
        raise ValueError(f"privacy.mode must be none, central or local, got {cfg.privacy.mode!r}")
    if cfg.privacy.mode == "central" and accountant is None:
        accountant = CentralAccountant(cfg.privacy.noise_multiplier, cfg.privacy.delta)
    if cfg.privacy.mode != "central":
        accountant = None
    strategy: FedAvg
    if f.strategy == "fedavg":
        strategy = FedeidFedAvg(**common)
    elif f.strategy == "fedprox":
        strategy = FedeidFedProx(**common, proximal_mu=f.proximal_mu)
    else:
        raise ValueError(f"fed.strategy must be fedavg or fedprox, got {f.strategy!r}")
    strategy._init_fedeid(cfg, expected, min_replies, accountant)  # type: ignore[attr-defined]
    return strategy
