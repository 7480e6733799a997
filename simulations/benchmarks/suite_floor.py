"""The attacker suite's floor: what it reports for a release that carries nothing of its input.

The model holder and the fusion attacker each report the best of many candidate matchers, chosen
with the true identities (an upper bound of a real attacker). On 60 queries, picking the best of
many chance-level rankings lands above chance by luck alone, so the suite's worst case has a
floor above chance even for a perfectly private method. This measures it: the "method" replaces
every image by fresh smoothed noise (drawn anew per call, so the model holder's gallery differs
from the queries as a stochastic release's does), scored by the whole suite, the retrained
attackers included, ``--repeats`` times.

Usage: ``python simulations/benchmarks/suite_floor.py --out reports/suite_floor.json [--preset quick]
[--repeats 3] [--set data.test_patients=90]`` (more held-out patients lower the floor; the
training patients stay the same).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedeid.commands import add_config_args, config_from_args  # noqa: E402
from fedeid.data.imageset import ImageSet  # noqa: E402
from fedeid.data.loaders import load_dataset  # noqa: E402
from fedeid.eval.attackers import AttackSuite  # noqa: E402
from fedeid.imaging import gaussian_blur  # noqa: E402
from fedeid.io import atomic_write_json  # noqa: E402


def noise_method(seed: int):
    """images, level -> fresh noise of the same shape and range, smoothed like anatomy (sigma 2 px)."""
    rng = np.random.default_rng(seed)

    def release(images: np.ndarray, level: float) -> np.ndarray:
        x = torch.as_tensor(rng.uniform(0, 1, images.shape), dtype=torch.float32)[:, None]
        return gaussian_blur(x, 2.0)[:, 0].numpy().astype(images.dtype)

    return release


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/suite_floor.json")
    parser.add_argument("--repeats", type=int, default=3)
    add_config_args(parser)  # --preset, --set (e.g. data.test_patients=90), as the fedeid commands take them
    args = parser.parse_args()
    cfg = config_from_args(args)
    sites, test = load_dataset(cfg.data)
    suite = AttackSuite(ImageSet.concat(sites), test, cfg, progress=False)
    runs = []
    for rep in range(args.repeats):
        scored = suite.score(noise_method(rep), 1.0)
        runs.append({name: {"p_at_1": round(v["p_at_1"], 4), **({"matcher": v["matcher"]} if "matcher" in v else {})}
                     for name, v in scored.items() if name != "worst_case"})
        runs[-1]["worst_case"] = {"p_at_1": round(scored["worst_case"]["p_at_1"], 4),
                                  "attacker": scored["worst_case"]["attacker"]}
        print(f"repeat {rep}: worst {scored['worst_case']['p_at_1']:.3f} ({scored['worst_case']['attacker']}); "
              + ", ".join(f"{n} {v['p_at_1']:.3f}" for n, v in runs[-1].items() if n != "worst_case"), flush=True)
    chance = scored["worst_case"]["chance_p_at_1"]
    worst = [r["worst_case"]["p_at_1"] for r in runs]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "preset": args.preset or "quick",
        "overrides": args.overrides,
        "n_test_patients": int(len(np.unique(test.patient_ids))),
        "chance_p_at_1": chance,
        "n_queries": scored["worst_case"]["n_queries"],
        "worst_p_at_1": {"median": statistics.median(worst), "min": min(worst), "max": max(worst)},
        "runs": runs,
    }
    atomic_write_json(args.out, result)
    print(f"floor of the suite's worst case: median {result['worst_p_at_1']['median']:.3f} "
          f"[{min(worst):.3f}-{max(worst):.3f}] = {result['worst_p_at_1']['median'] / chance:.1f}x chance "
          f"({chance:.3f}); written {args.out}")


if __name__ == "__main__":
    main()
