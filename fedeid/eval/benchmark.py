"""End-to-end runs: train (centrally) and evaluate fedeid against its baselines, write the report.

The federated path (``fedeid simulate``) trains differently but reports through the same
:func:`evaluate_and_report`, so central and federated figures are computed identically.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from fedeid.checkpoint import add_extra
from fedeid.config import Config
from fedeid.data.imageset import ImageSet
from fedeid.deid.pipeline import DeIdentifier
from fedeid.eval.calibration import calibration_from_results
from fedeid.deid.replace import replace_method, train_replace_deidentifier
from fedeid.eval.counterfactual import counterfactual_figures
from fedeid.eval.report import Evaluator, Method, acceptance, baseline_method, deid_method, summary_table, write_report
from fedeid.models.deid_model import build_deid_model
from fedeid.train import train_deid, train_reid

IMAGE_BASELINES = ("blur", "pixelate", "dppix")
TRAINED_SEPARATELY = ("no_decoupler", "replace")  # replace = method B (fedeid.deid.replace), opt-in


def train_central(train: ImageSet, cfg: Config, progress: bool = True) -> tuple[DeIdentifier, dict[str, float]]:
    """ReID, then decoupler + decoder, on one pooled dataset (the centralised reference)."""
    reid = train_reid(train, cfg, progress=progress)
    model = build_deid_model(cfg)
    metrics = train_deid(model, reid, train, cfg, cfg.train.deid_epochs, progress=progress)
    from fedeid.audit import record
    record("train.central", sites=int(len(set(train.sites.tolist()))), num_examples=len(train),
           reid_epochs=cfg.train.reid_epochs, deid_epochs=cfg.train.deid_epochs, privacy=cfg.privacy.mode)
    return DeIdentifier.from_models(model, reid, cfg), metrics


def method_name(deidentifier: Any) -> str:
    """The report's name of a trained de-identifier: ``fedeid`` (method A) or ``replace`` (method B,
    the name it has beside method A in the central benchmark)."""
    return "replace" if getattr(deidentifier, "method", "blocking") == "replace" else "fedeid"


def methods_for(deidentifier: Any, cfg: Config) -> dict[str, Method]:
    """The trained method plus the configured model-free and blocking baselines, all on the same images.

    A method-B de-identifier is scored with reproducible identity draws (:func:`replace_method`);
    the ``block`` baseline needs method A's ReID-ranked blocking and is left out beside it.
    """
    main = method_name(deidentifier)
    methods: dict[str, Method] = {main: replace_method(deidentifier, cfg.train.seed) if main == "replace"
                                  else deid_method(deidentifier)}
    for name in cfg.eval.baselines:
        if name == "block":
            if main == "fedeid":
                methods["block"] = deid_method(deidentifier, compensate=False)
        elif name in IMAGE_BASELINES:
            methods[name] = baseline_method(name, cfg.data.seed)
        elif name not in TRAINED_SEPARATELY:  # see run_central_benchmark
            raise ValueError(f"unknown baseline {name!r}; known: block, no_decoupler, replace, "
                             f"{', '.join(IMAGE_BASELINES)}")
    return methods


def evaluate_and_report(deidentifier: Any, train: ImageSet, test: ImageSet, cfg: Config,
                        out_dir: str | Path, extra_methods: dict[str, Method] | None = None,
                        extra: dict[str, Any] | None = None, progress: bool = True,
                        counterfactuals: Any | None = None, evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Score ``deidentifier`` (method A or B) beside the baselines and ``extra_methods``; write the report.

    ``counterfactuals``: a method-B de-identifier whose counterfactuals are measured too (by
    default ``deidentifier`` itself when it is one). ``evaluator``: a prepared
    :class:`Evaluator` on ``train``/``test``/``cfg`` (``fedeid simulate`` passes one that skips
    the adaptive attacker).
    """
    t0 = time.perf_counter()
    evaluator = evaluator or Evaluator(train, test, cfg, progress=progress)
    main = method_name(deidentifier)
    methods = methods_for(deidentifier, cfg) | (extra_methods or {})
    results = evaluator.run(methods, cfg.eval.levels)
    evaluator.write_grid({main: methods[main], **(extra_methods or {})}, Path(out_dir) / "grid.png")
    if counterfactuals is None and main == "replace":
        counterfactuals = deidentifier
    if counterfactuals is not None:
        evaluator.write_counterfactual_grid(counterfactuals, Path(out_dir) / "counterfactuals.png")
        results["counterfactuals"] = counterfactual_figures(counterfactuals, test, evaluator.classifier,
                                                            evaluator.suite.learned_net, evaluator.gallery,
                                                            evaluator.queries, evaluator.device)
    results["acceptance"] = acceptance(results, main)
    results["config"] = cfg.to_dict()
    results["timing"] = {"evaluation_seconds": time.perf_counter() - t0}
    results.update(extra or {})
    paths = write_report(results, out_dir)
    print(summary_table(results))
    cf_grid = " and counterfactuals.png" if counterfactuals is not None else ""
    print(f"report: {paths['json']}  plot: {paths['png']}  pictures: {Path(out_dir) / 'grid.png'}{cf_grid}")
    return results


def run_central_benchmark(sites: list[ImageSet], test: ImageSet, cfg: Config, out_dir: str | Path,
                          progress: bool = True) -> dict[str, Any]:
    """Train fedeid (and, if configured, the no-decoupler ablation) centrally, then evaluate."""
    train = ImageSet.concat(sites)
    t0 = time.perf_counter()
    deidentifier, metrics = train_central(train, cfg, progress)
    timing = {"train_seconds": time.perf_counter() - t0}
    extra_methods: dict[str, Method] = {}
    if "no_decoupler" in cfg.eval.baselines:
        ablation_cfg = copy.deepcopy(cfg)
        ablation_cfg.model.decouple = False
        ablation = build_deid_model(ablation_cfg)
        train_deid(ablation, deidentifier.reid, train, ablation_cfg, cfg.train.deid_epochs, progress=progress)
        extra_methods["no_decoupler"] = deid_method(DeIdentifier.from_models(ablation, deidentifier.reid, ablation_cfg))
        timing["ablation_train_seconds"] = time.perf_counter() - t0 - timing["train_seconds"]
    replace, replace_summary = None, {}
    if "replace" in cfg.eval.baselines:  # method B, on the same site ReID network
        t1 = time.perf_counter()
        replace, replace_summary = train_replace_deidentifier(train, cfg, deidentifier.reid, progress=progress)
        extra_methods["replace"] = replace_method(replace, cfg.train.seed)
        replace.save(Path(out_dir) / "replace_central.pt")
        timing["replace_train_seconds"] = time.perf_counter() - t1
    checkpoint = Path(out_dir) / "fedeid_central.pt"
    deidentifier.save(checkpoint, extra={"training": metrics})  # kept even if the evaluation fails
    results = evaluate_and_report(deidentifier, train, test, cfg, out_dir, extra_methods,
                                  extra={"training": metrics, "mode": "central", "train_timing": timing,
                                         **({"replace": replace_summary} if replace is not None else {})},
                                  progress=progress, counterfactuals=replace)
    # the checkpoint states what each level bought on these held-out patients (fedeid deid prints it)
    add_extra(checkpoint, calibration=calibration_from_results(results))
    return results
