"""How detectable each method's releases are: detectors that tell releases from originals.

A person looks at the picture grid; this measures what the grid shows. For each method and
level, :func:`fedeid.eval.realism.detectability` trains two detectors (a small CNN and logistic
regression on the frozen encoder's feature statistics) on the training images — originals
against their releases — and reports their ROC AUC on the held-out patients' originals and
releases (0.5: passes for a radiograph; 1.0: every release gives itself away), with the worst case,
and the Fréchet distance of the releases' encoder features to the originals' (graded, and not
trained on the method), beside that of held-out originals to training originals.

Usage::

    python simulations/benchmarks/realism.py --out reports/realism.json \\
        --model central=reports/quick/fedeid_central.pt \\
        --model federated=reports/main/federation/global.pt,reid=reports/main/federation/sites/site-0/reid.pt \\
        --model replace=reports/quick/replace_central.pt [--baselines blur,pixelate,dppix] [--levels 0.2,0.6,1]

Each model's releases are drawn with a fixed seed per call (reproducible figures); a model
checkpoint not found is an error naming it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedeid.config import preset  # noqa: E402
from fedeid.data.imageset import ImageSet  # noqa: E402
from fedeid.data.loaders import load_dataset  # noqa: E402
from fedeid.deid.pipeline import DeIdentifier  # noqa: E402
from fedeid.eval.attackers import Method  # noqa: E402
from fedeid.eval.realism import detectability  # noqa: E402
from fedeid.eval.report import baseline_method  # noqa: E402
from fedeid.io import atomic_write_json  # noqa: E402
from fedeid.models.encoder import build_encoder  # noqa: E402


def model_method(spec: str, seed: int) -> tuple[str, Method]:
    """``NAME=PATH[,reid=PATH][,prior=PATH]`` -> (name, images/level -> seeded releases)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"--model expects NAME=PATH[,reid=PATH][,prior=PATH], got {spec!r}")
    path, *extras = rest.split(",")
    kwargs = dict(item.split("=", 1) for item in extras if "=" in item)
    if len(kwargs) != len(extras) or not set(kwargs) <= {"reid", "prior"}:
        raise SystemExit(f"--model {name}: after the checkpoint only reid=PATH and prior=PATH, got {extras}")
    for p in (path, *kwargs.values()):
        if not Path(p).is_file():
            raise SystemExit(f"--model {name}: {p}: no such checkpoint")
    d = DeIdentifier.load(path, device="cpu", **kwargs)
    return name, lambda images, level: d.deidentify(images, level, seed=seed)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/realism.json")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH[,reid=PATH][,prior=PATH]")
    parser.add_argument("--baselines", default="blur,pixelate,dppix")
    parser.add_argument("--levels", default="0.2,0.6,1")
    args = parser.parse_args()
    cfg = preset(args.preset)
    sites, test = load_dataset(cfg.data)
    train = ImageSet.concat(sites)
    methods = dict(model_method(spec, cfg.train.seed) for spec in args.model)
    methods.update({b: baseline_method(b, cfg.data.seed) for b in filter(None, args.baselines.split(","))})
    levels = [float(v) for v in args.levels.split(",")]
    encoder = build_encoder(cfg.model.encoder, cfg.data.image_size)
    rows: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name, method in methods.items():
        rows[name] = {}
        for level in levels:
            r = detectability(train.images, method(train.images, level), test.images, method(test.images, level),
                              cfg, encoder)
            rows[name][f"{level:g}"] = r
            print(f"{name} level {level:g}: detect AUC {r['detect_auc']:.3f} ({r['detector']}; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["by_detector"].items())
                  + f"), feature FD {r['feature_fd']:.2f} (originals vs originals {r['feature_fd_reference']:.2f})",
                  flush=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "preset": args.preset,
        "models": args.model,
        "n_train_images": len(train), "n_test_images": len(test),
        "seconds": round(time.perf_counter() - t0, 1),
        "detect_auc": rows,
    }
    atomic_write_json(args.out, result)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
