"""``fedeid train``, ``fedeid deid`` and ``fedeid evaluate``: the central (single-site) commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fedeid.config import METHODS, Config, preset
from fedeid.io import InputError, atomic_save

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".dcm"}


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--preset`` and repeated ``--set section.key=value`` (the same keys as Flower's run config)."""
    p.add_argument("--preset", default="quick", choices=("quick", "full", "test"),
                   help="starting configuration (default: quick, 128 px)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.deid_epochs=20 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = preset(args.preset)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        cfg.set(key.strip(), value.strip())
    return cfg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train ReID + decoupler + decoder centrally and save a checkpoint",
                       description="Train the site's ReID network, then the MDL decoupler and the "
                                   "compensation decoder on the configured data (synthetic by default, "
                                   "or --set data.source=labels.csv), and save a DeIdentifier checkpoint.")
    add_config_args(p)
    p.add_argument("--out", required=True, type=Path, help="checkpoint file to write (.pt)")
    p.add_argument("--method", default="blocking", choices=METHODS,
                   help="blocking: method A (default); replace: method B, identity replacement with "
                        "synthetic identities (also makes counterfactuals)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("deid", help="de-identify a folder of images at a privacy level",
                       description="De-identify every PNG/JPEG/TIFF/NPY/DICOM image under IN (recursively) "
                                   "at --level and write 16-bit PNGs mirroring the tree under OUT. Images keep "
                                   "their resolution; only blocked patches are synthesised. Bad files are "
                                   "reported and skipped; inputs are never modified. For DICOM in and DICOM "
                                   "out with header de-identification use `fedeid dicom deid`.")
    p.add_argument("input", type=Path, help="folder (or single file) of images")
    p.add_argument("output", type=Path, help="output folder")
    p.add_argument("--model", required=True, type=Path, help="DeIdentifier checkpoint")
    p.add_argument("--reid", type=Path, help="this site's ReID checkpoint (for a global federated model)")
    p.add_argument("--level", required=True, type=float,
                   help="privacy level in [0, 1]: fraction of patches blocked (method A), or how far the "
                        "identity moves towards a synthetic one (method B)")
    p.add_argument("--method", choices=METHODS,
                   help="expect this method's checkpoint (default: whichever --model holds)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_deid)

    p = sub.add_parser("evaluate", help="privacy/utility/quality of fedeid vs baselines (JSON + PNG)",
                       description="Train fedeid centrally (or load --model), then measure re-identification "
                                   "(P@1, mAP@R, verification AUC, adaptive attacker), finding AUC (also "
                                   "retrained), SSIM and PSNR at every level for fedeid and the baselines "
                                   "(blur, pixelate, DP-Pix, blocking without compensation, no decoupler). "
                                   "Writes OUT/results.json and OUT/privacy_utility.png.")
    add_config_args(p)
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("--model", type=Path, help="evaluate this checkpoint instead of training one")
    p.set_defaults(func=cmd_evaluate)


def cmd_train(args: argparse.Namespace) -> int:
    from fedeid.data.imageset import ImageSet
    from fedeid.data.loaders import load_dataset
    from fedeid.eval.benchmark import train_central

    cfg = config_from_args(args)
    sites, _ = load_dataset(cfg.data)
    if args.method == "replace":
        from fedeid.deid.replace import train_replace_deidentifier

        replace, summary = train_replace_deidentifier(ImageSet.concat(sites), cfg, progress=True)
        replace.save(args.out)
        prior = summary["identity_prior"]
        print(f"saved {args.out} ({int(summary['training']['num_examples'])} images, "
              f"{summary['training']['train_seconds']:.0f} s; identity margin {prior['margin']:.3f}, at which "
              f"{100 * prior['tpr_at_margin']:.0f} % of a patient's own image pairs match; "
              f"{100 * prior['rejection_rate']:.1f} % of synthetic identities rejected)")
        return 0
    deidentifier, metrics = train_central(ImageSet.concat(sites), cfg, progress=True)
    deidentifier.save(args.out, extra={"training": metrics})
    print(f"saved {args.out} ({int(metrics['num_examples'])} images, {metrics['train_seconds']:.0f} s)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedeid.data.imageset import ImageSet
    from fedeid.data.loaders import load_dataset
    from fedeid.deid.pipeline import DeIdentifier
    from fedeid.eval.benchmark import evaluate_and_report, run_central_benchmark

    if args.model:
        deidentifier = DeIdentifier.load(args.model)
        cfg = deidentifier.cfg
        sites, test = load_dataset(cfg.data)
        evaluate_and_report(deidentifier, ImageSet.concat(sites), test, cfg, args.out)
    else:
        cfg = config_from_args(args)
        sites, test = load_dataset(cfg.data)
        run_central_benchmark(sites, test, cfg, args.out)
    return 0


def find_images(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(root, "no such file or folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def cmd_deid(args: argparse.Namespace) -> int:
    from fedeid.deid.pipeline import DeIdentifier

    deidentifier = DeIdentifier.load(args.model, reid=args.reid, device=args.device, method=args.method)
    if not 0.0 <= args.level <= 1.0:
        raise ValueError(f"--level must lie in [0, 1], got {args.level}")
    done, failed = transform_images(args.input, args.output, lambda image: deidentifier.deidentify_native(
        image, args.level)[0], desc="de-identify")
    print(f"de-identified {done} image(s) at level {args.level}; {failed} failed")
    return 0 if failed == 0 else 1


def transform_images(root: Path, output: Path, fn: Callable[[np.ndarray], np.ndarray],
                     desc: str) -> tuple[int, int]:
    """Read every image under ``root``, write ``fn(image)`` as a 16-bit PNG mirroring the tree under
    ``output``; a bad file is reported and skipped. Returns (done, failed)."""
    from fedeid.data.loaders import read_image

    files = find_images(root)
    base = root if root.is_dir() else root.parent
    done, failed = 0, 0
    for path in tqdm(files, desc=desc, unit="img"):
        try:
            out = fn(read_image(path))
        except InputError as exc:
            print(f"fedeid: {exc}", file=sys.stderr)
            failed += 1
            continue
        target = (output / path.relative_to(base)).with_suffix(".png")
        pixels = np.round(out * 65535).astype(np.uint16)
        atomic_save(target, lambda fh, px=pixels: Image.fromarray(px).save(fh, format="PNG"))
        done += 1
    return done, failed
