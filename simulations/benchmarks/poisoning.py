"""How far one poisoned site moves the global model, per aggregation rule, with DP off and on.

N honest sites and one hostile site answer a round with the real decoupler + decoder arrays
(the shapes of ``--preset``'s model); the real strategy (:func:`fedeid.federated.strategy.
make_strategy`: contract, value screen, rule, central DP) aggregates them through the
in-process grid. No training: an honest site's update is a shared direction plus its own
heterogeneity, each tensor scaled to ``--step`` × its RMS (a plausible local-training step).

Attacks (the hostile site's reply):

* ``scaled-1e6`` — an honest update × 1e6;
* ``sign-flip-x5`` — its honest update × −5 (inside the default norm bound of 10 × median);
* ``nan`` — an honest update with one NaN;
* ``claim-1e9`` — an update against the honest direction, claiming 1e9 examples;
* ``small-directed`` — an update against the honest mean, of exactly the median honest norm:
  it passes every value check, so only the rule limits it.

Reported: ``‖G_attacked − G_honest‖ / ‖F_honest − G_0‖`` — the L2 distance between the round's
global model with the hostile site and the same round when that site is honest (same rule;
where the hostile reply was rejected, what remains is the loss of one site), in units of the
all-honest FedAvg step without DP (``F_honest − G_0``). With DP on, every update is clipped to
the median honest update norm and aggregated by the rule; the Gaussian noise, which does not
depend on the replies, is left out of the distance and its expected norm at ``--noise`` ×
the rule's sensitivity is printed below in the same unit.

Usage: ``python simulations/benchmarks/poisoning.py --out reports/poisoning.json [--preset quick]``
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedeid.config import preset
from fedeid.federated.arrays import state_to_record
from fedeid.federated.inprocess import InProcessGrid
from fedeid.federated.robust import RULES
from fedeid.federated.runconfig import run_config_for
from fedeid.federated.strategy import make_strategy
from fedeid.io import atomic_write_json
from fedeid.models.deid_model import build_deid_model, shared_state

ATTACKS = ("none", "scaled-1e6", "sign-flip-x5", "nan", "claim-1e9", "small-directed")
CLAIM = 40


def honest_updates(glob: dict[str, np.ndarray], n: int, step: float, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    scale = {k: step * (float(np.sqrt(np.mean(np.square(v)))) or 1e-3) for k, v in glob.items()}
    common = {k: rng.normal(0.0, 1.0, v.shape) for k, v in glob.items()}
    return [{k: scale[k] * (common[k] + rng.normal(0.0, 1.0, v.shape)) for k, v in glob.items()} for _ in range(n)]


def norm(update: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.square(u)) for u in update.values())))


def hostile(attack: str, own: dict[str, np.ndarray], honest: list[dict[str, np.ndarray]]
            ) -> tuple[dict[str, np.ndarray], float]:
    """The hostile site's update and num-examples claim."""
    mean = {k: np.mean([h[k] for h in honest], axis=0) for k in own}
    against = {k: -v / norm(mean) for k, v in mean.items()}  # unit vector opposing the honest mean
    if attack == "scaled-1e6":
        return {k: 1e6 * v for k, v in own.items()}, CLAIM
    if attack == "sign-flip-x5":
        return {k: -5.0 * v for k, v in own.items()}, CLAIM
    if attack == "nan":
        poisoned = {k: v.copy() for k, v in own.items()}
        next(iter(poisoned.values())).flat[0] = np.nan
        return poisoned, CLAIM
    if attack == "claim-1e9":
        return {k: norm(own) * v for k, v in against.items()}, 1e9
    if attack == "small-directed":
        return {k: float(np.median([norm(h) for h in honest])) * v for k, v in against.items()}, CLAIM
    return own, CLAIM


def one_round(cfg: Any, glob: ArrayRecord, updates: list[dict[str, np.ndarray]], claims: list[float],
              noise_seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The real strategy's aggregate of one round in which site i replies ``glob + updates[i]``."""
    def app(msg: Message, context: Any) -> Message:
        i = int(context.node_config["partition-id"])
        arrays = {k: Array((a.numpy() + updates[i][k]).astype(np.float32)) for k, a in glob.items()}
        return Message(RecordDict({"arrays": ArrayRecord(arrays),
                                   "metrics": MetricRecord({"num-examples": claims[i], "site-id": i})}), reply_to=msg)

    rc = run_config_for(cfg, out_dir="unused")
    grid = InProcessGrid(app, [{"partition-id": i} for i in range(len(updates))], rc)
    spec = {k: (tuple(a.shape), str(a.numpy().dtype)) for k, a in glob.items()}
    strategy = make_strategy(cfg, spec, evaluate=False)
    strategy.noise_rng = np.random.default_rng(noise_seed)  # type: ignore[attr-defined]
    msgs = strategy.configure_train(1, glob, ConfigRecord({}), grid)
    new, _ = strategy.aggregate_train(1, grid.send_and_receive(msgs))
    info = strategy.round_info[1]  # type: ignore[attr-defined]
    out = new if new is not None else glob
    return np.concatenate([out[k].numpy().astype(np.float64).ravel() for k in glob.keys()]), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--honest", type=int, default=6, help="honest sites (Bulyan with f=1 needs 7 in all)")
    ap.add_argument("--step", type=float, default=0.01, help="honest update per tensor, x its RMS")
    ap.add_argument("--noise", type=float, default=1.0, help="central DP noise multiplier (DP on)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/poisoning.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg0 = preset(args.preset)
    torch.manual_seed(cfg0.train.seed)
    state = shared_state(build_deid_model(cfg0))
    glob = state_to_record(state)
    g0 = np.concatenate([a.numpy().astype(np.float64).ravel() for a in glob.values()])
    base = {k: a.numpy() for k, a in glob.items()}
    n = args.honest + 1
    honest = honest_updates(base, n, args.step, args.seed)  # site 0 is the hostile one when it attacks
    median_norm = float(np.median([norm(h) for h in honest]))
    rows = []
    unit = 0.0  # the all-honest FedAvg step without DP: every distance is in units of it
    for dp in (False, True):
        for rule in RULES:
            cfg = preset(args.preset)
            cfg.data.n_sites = cfg.fed.min_clients = n
            cfg.fed.aggregation = rule
            if dp:  # clipping and the rule at z = 0; the noise (independent of the replies) is sized below
                cfg.privacy.mode = "central"
                cfg.privacy.noise_multiplier = 0.0
                cfg.privacy.clipping_norm = median_norm
            ref, ref_info = one_round(cfg, glob, honest, [CLAIM] * n, args.seed)
            unit = unit or float(np.linalg.norm(ref - g0))
            for attack in ATTACKS:
                update, claim = hostile(attack, honest[0], honest[1:])
                got, info = one_round(cfg, glob, [update] + honest[1:], [claim] + [CLAIM] * (n - 1), args.seed)
                dist = float(np.linalg.norm(got - ref)) if np.isfinite(got).all() else float("inf")
                row = {"dp": dp, "rule": rule, "attack": attack, "relative_distance": dist / unit,
                       "rejections": info.get("rejections", {}), "aggregated": info.get("aggregated"),
                       "weights": info.get("screen", {}).get("weights")}
                if dp:  # the noise z * sensitivity * N(0, I) the round adds at --noise: its expected norm
                    row["noise_std"] = args.noise * ref_info["central_dp"]["sensitivity"]
                    row["noise_relative"] = row["noise_std"] * np.sqrt(g0.size) / unit
                rows.append(row)
    seconds = time.perf_counter() - t0
    for dp in (False, True):
        print("\nL2 distance from the all-honest aggregate (unit: the honest FedAvg step), DP "
              + ("on (clipped to C = median honest norm; noise not included)" if dp else "off"))
        print(f"{'attack':<16}" + "".join(f"{r:>14}" for r in RULES))
        for attack in ATTACKS:
            cells = [next(x for x in rows if x["dp"] == dp and x["rule"] == r and x["attack"] == attack) for r in RULES]
            print(f"{attack:<16}" + "".join(f"{c['relative_distance']:>13.3g}{' ' if c['aggregated'] else '*'}"
                                            for c in cells))
        if dp:
            print(f"{'noise at z=%g' % args.noise:<16}" + "".join(
                f"{next(x for x in rows if x['dp'] and x['rule'] == r)['noise_relative']:>14.3g}" for r in RULES))
    print("* round not aggregated (fewer valid replies than the rule needs): the global model is kept")
    print(f"\n{n} sites (1 hostile), {g0.size} parameters ({args.preset} preset), {seconds:.1f} s")
    atomic_write_json(args.out, {"preset": args.preset, "sites": n, "hostile": 1, "parameters": int(g0.size),
                                 "step": args.step, "unit_l2": unit, "noise_multiplier": args.noise,
                                 "clipping_norm": median_norm,
                                 "defaults": {"update_norm_factor": cfg0.fed.update_norm_factor,
                                              "weighting": cfg0.fed.weighting,
                                              "max_weight_ratio": cfg0.fed.max_weight_ratio,
                                              "trim_fraction": cfg0.fed.trim_fraction, "byzantine": cfg0.fed.byzantine},
                                 "rows": rows, "seconds": seconds})


if __name__ == "__main__":
    main()
