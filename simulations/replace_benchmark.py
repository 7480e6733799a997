"""Method B alone through the evaluator: train the site ReID network and method B centrally, fit
the identity prior, score de-identification at every strength and the counterfactuals.

    python simulations/replace_benchmark.py --preset quick --out reports/replace

Method A and the baselines are scored side by side by ``fedeid evaluate --set
eval.baselines=blur,pixelate,dppix,block,no_decoupler,replace``; this script is the cheaper run
that trains method B only (for a shared machine). Writes OUT/results.json (the evaluator's
format, plus ``counterfactuals``, ``identity_prior`` and timings), OUT/pictures.png and OUT/replace.pt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedeid.commands import add_config_args, config_from_args
from fedeid.data.imageset import ImageSet
from fedeid.data.loaders import load_dataset
from fedeid.deid.replace import replace_method, train_replace_deidentifier
from fedeid.eval.counterfactual import counterfactual_figures
from fedeid.eval.grid import first_of_patients, picture_columns, write_picture_grid
from fedeid.eval.report import Evaluator, summary_table, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    sites, test = load_dataset(cfg.data)
    train = ImageSet.concat(sites)
    replace, summary = train_replace_deidentifier(train, cfg, progress=False)
    replace.save(args.out / "replace.pt")
    t_train = time.perf_counter() - t0
    print(f"trained in {t_train:.0f} s; prior {summary['identity_prior']}", flush=True)
    evaluator = Evaluator(train, test, cfg, progress=False)
    results = evaluator.run({"replace": replace_method(replace, cfg.train.seed)}, cfg.eval.levels)
    results["counterfactuals"] = counterfactual_figures(replace, test, evaluator.classifier, evaluator.attacker,
                                                        evaluator.gallery, evaluator.queries, evaluator.device)
    results["identity_prior"] = summary["identity_prior"]
    results["training"] = summary["training"]
    results["config"] = cfg.to_dict()
    results["timing"] = {"train_seconds": t_train, "total_seconds": time.perf_counter() - t0}
    paths = write_report(results, args.out)
    shown = test.images[first_of_patients(test.patient_ids)]
    write_picture_grid(picture_columns(shown, test.finding_names, replace=replace, seed=cfg.train.seed),
                       args.out / "pictures.png")
    print(summary_table(results))
    print(results["counterfactuals"])
    print(f"report: {paths['json']} ({results['timing']['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
