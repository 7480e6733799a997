"""Choose between method-A variants with several training seeds, not one run.

    python simulations/variants.py --preset quick --out reports/variants \\
        --variant base= --variant reid128=model.reid_size=128 --seeds 0,1,2 --levels 1,0.8

One run per variant is not enough to choose one. Retrained with another ``train.seed`` and
nothing else changed, the quick model's level-1 finding AUC ranged 0.52-0.72 over three seeds,
wider than every gain a single-run comparison had suggested. So this script
trains every variant (``NAME=KEY=VALUE;KEY=VALUE``, empty for the preset itself) once per
``train.seed``, scores all models with one :class:`fedeid.eval.report.Evaluator` (the same
attackers, utility classifier and held-out patients, the whole attacker suite, adaptive included),
and reports per variant and level the mean and the spread over the seeds of the worst-case P@1 and
the finding AUC. A variant is better only where its mean beats the other's by more than the spread.
Writes ``variants.json`` (every run's row too) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedeid.commands import parse_override  # noqa: E402
from fedeid.config import Config, preset  # noqa: E402
from fedeid.io import atomic_write_json  # noqa: E402

KEYS = ("worst_p_at_1", "utility_auc", "utility_auc_retrained")


def parse_variant(text: str) -> tuple[str, list[tuple[str, str]]]:
    """``name=key=value;key=value`` -> (name, [(key, value), ...]); ``name=`` is the preset itself."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant expects NAME=KEY=VALUE[;KEY=VALUE] or NAME=, got {text!r}")
    try:
        return name, [parse_override(item) for item in filter(None, rest.split(";"))]
    except ValueError as exc:
        raise ValueError(f"--variant {name}: {exc}") from exc


def configure(base: Config, pairs: list[tuple[str, str]], seed: int) -> Config:
    cfg = copy.deepcopy(base)
    for key, value in pairs:
        cfg.set(key, value)
    cfg.train.seed = seed
    return cfg


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation, min and max over the seeds of each figure in KEYS."""
    out = {}
    for k in KEYS:
        v = np.asarray([r[k] for r in rows if r.get(k) is not None], dtype=float)
        if len(v):
            out[k] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                      "min": float(v.min()), "max": float(v.max())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="quick", choices=("quick", "full", "test"))
    p.add_argument("--variant", action="append", required=True, help="NAME=KEY=VALUE[;KEY=VALUE], or NAME= ")
    p.add_argument("--seeds", default="0,1,2", help="train.seed values, comma-separated")
    p.add_argument("--levels", default="1,0.8", help="levels to score, comma-separated")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)

    from fedeid.data.imageset import ImageSet
    from fedeid.data.loaders import load_dataset
    from fedeid.eval.benchmark import train_central
    from fedeid.eval.report import Evaluator, deid_method

    variants = [parse_variant(v) for v in args.variant]
    seeds = [int(s) for s in args.seeds.split(",")]
    levels = [float(v) for v in args.levels.split(",")]
    base = preset(args.preset)
    sites, test = load_dataset(base.data)
    train = ImageSet.concat(sites)
    t0 = time.perf_counter()
    evaluator = Evaluator(train, test, base, progress=False)
    report: dict[str, Any] = {"preset": args.preset, "seeds": seeds, "levels": levels,
                              "chance": 1 / len(set(test.patient_ids.tolist())),
                              "variants": {}, "evaluator_seconds": time.perf_counter() - t0}
    for name, pairs in variants:
        runs = []
        for seed in seeds:
            cfg = configure(base, pairs, seed)
            t = time.perf_counter()
            deid, _ = train_central(train, cfg, progress=False)
            train_s = time.perf_counter() - t
            method = deid_method(deid)
            for lv in levels:
                row = evaluator.score(method, lv)
                runs.append({"seed": seed, "level": lv, "train_seconds": train_s,
                             **{k: row.get(k) for k in KEYS}, "worst_attacker": row.get("worst_attacker")})
                print(f"{name} seed {seed} level {lv}: worst P@1 {row['worst_p_at_1']:.3f} "
                      f"({row.get('worst_attacker')}), finding AUC {row['utility_auc']:.3f}", flush=True)
        report["variants"][name] = {"set": [f"{k}={v}" for k, v in pairs], "runs": runs,
                                    "summary": {str(lv): summarise([r for r in runs if r["level"] == lv])
                                                for lv in levels}}
        atomic_write_json(args.out / "variants.json", report)
    print(f"\n| variant | level | worst P@1 mean ± sd [min–max] | finding AUC mean ± sd [min–max] |  ({len(seeds)} seeds)")
    for name, v in report["variants"].items():
        for lv, s in v["summary"].items():
            w, u = s["worst_p_at_1"], s["utility_auc"]
            print(f"| {name} | {lv} | {w['mean']:.3f} ± {w['sd']:.3f} [{w['min']:.3f}–{w['max']:.3f}] "
                  f"| {u['mean']:.3f} ± {u['sd']:.3f} [{u['min']:.3f}–{u['max']:.3f}] |")
    print(f"wrote {args.out / 'variants.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
