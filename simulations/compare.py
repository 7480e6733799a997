"""Federated vs centralized vs each site alone, on the same held-out patients; N and ε sweeps.

    python simulations/compare.py --preset quick --out reports/compare            # everything
    python simulations/compare.py --preset quick --out reports/compare --only base
    python simulations/compare.py --preset test --out /tmp/cmp --sites 2,3 --epsilons 8,2   # smoke

Every model is scored by ONE :class:`fedeid.eval.report.Evaluator` — the same attacker, the same
utility classifier, the same held-out patients (``generate_test`` of the base configuration) —
so the figures are directly comparable:

* ``federated`` — Flower (``--engine``, default the simulation runtime) over the base sites; the
  global decoupler/decoder with site 0's own ReID, as site 0 would de-identify;
* ``centralized`` — the same networks trained on all sites' images pooled (the upper reference);
* ``site<i>_alone`` — each site trains on its own images only (with its own ReID), to be set
  against ``federated@site<i>``: the global model with that site's ReID, i.e. what the site gets
  by joining;

all with the same number of de-identification epochs (rounds × local epochs). Then:

* **N sweep** — federations of N sites (sites 0..N-1, each site's data identical for every N);
* **ε sweep** — local DP-SGD (Opacus; ``--dp central`` for server-side DP) with the noise
  multiplier calibrated to each target ε over the whole training; the ε actually spent is read
  back from the accountants.

Sweeps use the in-process engine (same ServerApp logic and ClientApp, no Ray) and skip the
adaptive attacker (``--adaptive`` turns it on). Writes ``compare.json`` and ``compare.png``,
``sweep_sites.png``, ``sweep_epsilon.png``, plus the federation's bytes and timing figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedeid.commands import config_from_args  # noqa: E402
from fedeid.config import Config  # noqa: E402
from fedeid.data.imageset import ImageSet  # noqa: E402
from fedeid.io import atomic_save, atomic_write_json  # noqa: E402


def train_alone(data: ImageSet, cfg: Config, epochs: int) -> Any:
    """The central training path (fedeid.eval.benchmark.train_central) with a given epoch budget."""
    from fedeid.eval.benchmark import train_central

    c = copy.deepcopy(cfg)
    c.train.deid_epochs = epochs
    deid, metrics = train_central(data, c, progress=False)
    return deid, metrics


def federated(cfg: Config, out: Path, engine: str) -> tuple[Any, dict[str, Any]]:
    """Train federatedly; the global model with site 0's ReID (and ``site_deids``: with each site's)."""
    from fedeid.deid.pipeline import DeIdentifier
    from fedeid.federated.commands import federated_summary
    from fedeid.federated.simulation import simulate

    fed = simulate(cfg, out, engine=engine, evaluate=False)
    deids = [DeIdentifier.load(fed["paths"]["global"], reid=r, device=cfg.train.device)
             for r in fed["paths"]["site_reid"]]
    return deids[0], {"summary": federated_summary(fed, cfg), "rounds": fed["rounds"],
                      "wall_seconds": fed["wall_seconds"], "site_deids": deids}


def score(evaluator: Any, deid: Any, levels: tuple[float, ...], adaptive: bool) -> dict[str, list[float]]:
    from fedeid.eval.report import deid_method

    method = deid_method(deid)
    rows = [evaluator.score(method, lv, adaptive=adaptive) for lv in levels]
    return {"levels": list(levels), **{k: [r.get(k) for r in rows] for k in rows[0]}}


# the privacy axis of every comparison: the worst case over the attacker suite, never one attacker
PRIVACY = "worst_p_at_1"


def utility_at_privacy(curve: dict[str, list[float]], p_targets: list[float]) -> list[float | None]:
    """Utility AUC interpolated at given worst-case P@1 values along a method's level curve."""
    p = np.asarray(curve[PRIVACY], dtype=float)
    u = np.asarray(curve["utility_auc"], dtype=float)
    order = np.argsort(p)
    p, u = p[order], u[order]
    return [float(np.interp(t, p, u)) if p[0] - 1e-9 <= t <= p[-1] + 1e-9 else None for t in p_targets]


def compare_to_central(curves: dict[str, dict[str, list[float]]], name: str, ref: str = "centralized"
                       ) -> dict[str, Any]:
    """``name`` against ``ref``: utility ratio at the same level and at ``ref``'s privacy (P@1)."""
    c, f = curves[ref], curves[name]
    ratio_level = [fu / cu if cu else None for fu, cu in zip(f["utility_auc"], c["utility_auc"])]
    at_p = utility_at_privacy(f, c[PRIVACY])
    ratio_priv = [a / cu if (a is not None and cu) else None for a, cu in zip(at_p, c["utility_auc"])]
    return {"levels": c["levels"], "utility_ratio_same_level": ratio_level,
            "p_at_1_diff_same_level": [fp - cp for fp, cp in zip(f[PRIVACY], c[PRIVACY])],
            "utility_ratio_same_privacy": ratio_priv}


def dp_noise(cfg: Config, target_eps: float, dp: str, site_size: int) -> float:
    from fedeid.privacy.accountant import noise_for_epsilon

    if dp == "central":
        return noise_for_epsilon(target_eps, cfg.privacy.delta, cfg.fed.fraction_train, cfg.fed.rounds)
    q = cfg.train.batch_size / site_size
    steps = cfg.fed.rounds * cfg.fed.local_epochs * math.ceil(1 / q)
    return noise_for_epsilon(target_eps, cfg.privacy.delta, q, steps)


def save_figure(fig: Any, axes: Any, path: Path) -> None:
    """Grid, legends, tight layout, atomic PNG: how every figure of this script ends."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def plot_compare(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        style = "-" if name in ("federated", "centralized") else ("--" if name.startswith("federated@") else ":")
        axes[0].plot(c[PRIVACY], c["utility_auc"], style, marker="o", label=name)
        axes[1].plot(c["levels"], c["utility_auc"], style, marker="o", label=name)
    axes[0].set(xlabel="worst-case P@1 over the attacker suite (lower = more private)", ylabel="finding AUC (utility)",
                title=title)
    axes[1].set(xlabel="privacy level (fraction of patches blocked)", ylabel="finding AUC")
    save_figure(fig, axes, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", choices=("quick", "full", "test"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--engine", choices=("flwr", "inprocess"), default="flwr", help="engine of the base federation")
    p.add_argument("--only", choices=("base", "sites", "epsilon"), action="append",
                   help="run only these parts (repeatable; default all)")
    p.add_argument("--sites", default="2,3,5", help="N sweep (comma separated)")
    p.add_argument("--epsilons", default="16,8,4,2", help="ε sweep targets (comma separated)")
    p.add_argument("--dp", choices=("local", "central"), default="local", help="DP kind of the ε sweep")
    p.add_argument("--sweep-level", type=float, default=None,
                   help="score sweeps at this level only (default: every configured level)")
    p.add_argument("--adaptive", action="store_true", help="also retrain the adaptive attacker (slow)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from fedeid.data.synthetic import generate
    from fedeid.eval.report import Evaluator

    cfg = config_from_args(args)
    cfg.fed.num_supernodes = cfg.data.n_sites
    cfg.fed.min_clients = min(cfg.fed.min_clients, cfg.data.n_sites)
    parts = set(args.only or ("base", "sites", "epsilon"))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    epochs = cfg.fed.rounds * cfg.fed.local_epochs
    levels = tuple(cfg.eval.levels)
    sweep_levels = (args.sweep_level,) if args.sweep_level is not None else levels
    t0 = time.perf_counter()
    sites, test = generate(cfg.data)
    train = ImageSet.concat(sites)
    print(f"evaluator: {len(train)} training images, {len(test)} held-out images", file=sys.stderr)
    evaluator = Evaluator(train, test, cfg, progress=False)
    result: dict[str, Any] = {"config": cfg.to_dict(), "deid_epochs_each": epochs, "levels": list(levels),
                              "evaluator_seconds": time.perf_counter() - t0}
    path_json = out / "compare.json"

    def save() -> None:
        atomic_write_json(path_json, result)

    if "base" in parts:
        curves: dict[str, dict[str, list[float]]] = {}
        timing: dict[str, float] = {}
        t = time.perf_counter()
        deid, fed_info = federated(cfg, out / "federated", args.engine)
        timing["federated"] = time.perf_counter() - t
        curves["federated"] = score(evaluator, deid, levels, args.adaptive)
        # what each hospital gets from the federation: the global model with ITS OWN ReID
        for i, d in enumerate(fed_info["site_deids"][1:], start=1):
            curves[f"federated@site{i}"] = score(evaluator, d, levels, args.adaptive)
        t = time.perf_counter()
        deid_c, _ = train_alone(train, cfg, epochs)
        timing["centralized"] = time.perf_counter() - t
        curves["centralized"] = score(evaluator, deid_c, levels, args.adaptive)
        sizes = []
        for i, s in enumerate(sites):
            t = time.perf_counter()
            d, _ = train_alone(s, cfg, epochs)
            timing[f"site{i}_alone"] = time.perf_counter() - t
            curves[f"site{i}_alone"] = score(evaluator, d, levels, args.adaptive)
            sizes.append(len(s))
        smallest = int(np.argmin(sizes))
        fed_at = lambda i: "federated" if i == 0 else f"federated@site{i}"  # noqa: E731
        fed_vs_small = [fu - su for fu, su in zip(curves[fed_at(smallest)]["utility_auc"],
                                                   curves[f"site{smallest}_alone"]["utility_auc"])]
        result["base"] = {
            "curves": curves, "train_seconds": timing, "site_sizes": sizes, "smallest_site": smallest,
            "federated_vs_centralized": compare_to_central(curves, "federated"),
            "federated_vs_smallest_site": compare_to_central(curves, fed_at(smallest), f"site{smallest}_alone"),
            "federated_vs_site_alone": {i: compare_to_central(curves, fed_at(i), f"site{i}_alone")
                                        for i in range(len(sites))},
            "federated_minus_smallest_site_utility": fed_vs_small,
            "federation": fed_info["summary"], "federation_rounds": fed_info["rounds"],
        }
        plot_compare(curves, out / "compare.png", f"{cfg.data.n_sites} sites, {epochs} de-id epochs each")
        save()

    if "sites" in parts:
        rows = []
        for n in [int(x) for x in args.sites.split(",") if x.strip()]:
            if n == cfg.data.n_sites and "base" in result:  # the base federation is this point
                base = result["base"]
                idx = [base["curves"]["federated"]["levels"].index(lv) for lv in sweep_levels]
                rows.append({"sites": n, "train_seconds": base["train_seconds"]["federated"],
                             "curve": {k: [v[i] for i in idx] for k, v in base["curves"]["federated"].items()},
                             "bytes_per_round": base["federation"].get("bytes_per_round_all_sites")})
                continue
            c = copy.deepcopy(cfg)
            c.data.n_sites = n
            c.fed.num_supernodes = n
            c.fed.min_clients = min(cfg.fed.min_clients, n)
            t = time.perf_counter()
            deid, info = federated(c, out / f"sites-{n}", "inprocess")
            rows.append({"sites": n, "train_seconds": time.perf_counter() - t,
                         "curve": score(evaluator, deid, sweep_levels, args.adaptive),
                         "bytes_per_round": info["summary"].get("bytes_per_round_all_sites")})
            result["sweep_sites"] = rows
            save()
        _plot_sweep(rows, "sites", out / "sweep_sites.png", "federated sites N")

    if "epsilon" in parts:
        rows = []
        site_size = min(len(s) for s in sites)
        for target in [float(x) for x in args.epsilons.split(",") if x.strip()]:
            c = copy.deepcopy(cfg)
            c.privacy.mode = args.dp
            c.privacy.noise_multiplier = dp_noise(c, target, args.dp, site_size)
            t = time.perf_counter()
            try:
                deid, info = federated(c, out / f"eps-{args.dp}-{target:g}", "inprocess")
            except Exception as exc:  # noqa: BLE001 - record and go on with the sweep
                rows.append({"target_epsilon": target, "error": f"{type(exc).__name__}: {exc}"[:500]})
                result["sweep_epsilon"] = rows
                save()
                continue
            s = info["summary"]
            spent = (s.get("central_dp") or {}).get("epsilon") if args.dp == "central" else \
                (s.get("local_dp") or {}).get("epsilon_max")
            rows.append({"target_epsilon": target, "dp": args.dp, "noise_multiplier": c.privacy.noise_multiplier,
                         "epsilon_spent": spent, "delta": c.privacy.delta, "train_seconds": time.perf_counter() - t,
                         "curve": score(evaluator, deid, sweep_levels, args.adaptive)})
            result["sweep_epsilon"] = rows
            save()
        if "base" in result:  # the non-private federated model is the ε = ∞ end of the sweep
            base = result["base"]["curves"]["federated"]
            idx = [base["levels"].index(lv) for lv in sweep_levels if lv in base["levels"]]
            rows.append({"target_epsilon": None, "dp": "none", "epsilon_spent": None,  # no DP: ε = ∞
                         "curve": {k: [v[i] for i in idx] for k, v in base.items()}})
        result["sweep_epsilon"] = rows
        _plot_sweep([r for r in rows if "curve" in r], "epsilon_spent", out / "sweep_epsilon.png",
                    f"ε spent ({args.dp} DP, δ={cfg.privacy.delta:g})")
    result["total_seconds"] = time.perf_counter() - t0
    save()
    print(json.dumps({k: v for k, v in result.items() if k in ("total_seconds",)}, indent=1))
    print(f"wrote {path_json}")
    return 0


def _plot_sweep(rows: list[dict[str, Any]], key: str, path: Path, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    levels = rows[0]["curve"]["levels"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r.get(key) if r.get(key) is not None and math.isfinite(r[key]) else None for r in rows]
    finite = [x for x in xs if x is not None]
    inf_x = (max(finite) * 2 if finite else 1.0)
    xs = [x if x is not None else inf_x for x in xs]
    for j, lv in enumerate(levels):
        axes[0].plot(xs, [r["curve"][PRIVACY][j] for r in rows], marker="o", label=f"level {lv:g}")
        axes[1].plot(xs, [r["curve"]["utility_auc"][j] for r in rows], marker="o", label=f"level {lv:g}")
    axes[0].set(xlabel=xlabel, ylabel="worst-case P@1 over the attacker suite")
    axes[1].set(xlabel=xlabel, ylabel="finding AUC on de-identified images")
    if key == "epsilon_spent":
        for ax in axes:
            ax.set_xscale("log")
            ax.annotate("no DP", (inf_x, ax.get_ylim()[0]), fontsize=7)
    save_figure(fig, axes, path)


if __name__ == "__main__":
    sys.exit(main())
