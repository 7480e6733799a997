"""``fedeid train``, ``fedeid deid`` and ``fedeid evaluate``: the central (single-site) commands."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedeid.config import METHODS, Config, preset
from fedeid.io import (InputError, OutputFolder, atomic_save, batch_exit_code, check_new_file, file_sha256,
                       file_stamp)

# Heavy modules (numpy, PIL, torch, the models) are imported inside the command functions, so
# that ``fedeid --help`` and argument errors answer at once.

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".dcm"}


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--preset`` and repeated ``--set section.key=value`` (the same keys as Flower's run config)."""
    p.add_argument("--preset", choices=("quick", "full", "test"),
                   help="starting configuration (default: quick, 128 px)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.deid_epochs=20 (repeatable)")


def add_image_batch_args(p: argparse.ArgumentParser) -> None:
    """IN, OUT and the output options of the commands that run :func:`transform_images`."""
    p.add_argument("input", type=Path, help="folder (or single file) of images")
    p.add_argument("output", type=Path, help="output folder (created; must lie outside IN)")
    add_output_args(p)


def add_output_args(p: argparse.ArgumentParser) -> None:
    """``--overwrite`` and ``--no-progress``, the same for every command that writes files."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files that fedeid did not write (default: refuse them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


# at most this many native pixels in one batch of transform_images (32 Mpx: about 128 MB of float32
# inputs, and as much again for their outputs, whatever the images' sizes)
BATCH_PIXELS = 32 * 1024 * 1024


def parse_override(item: str) -> tuple[str, str]:
    """``KEY=VALUE`` (a ``--set`` item) -> (key, value), or ValueError naming the item."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    return key.strip(), value.strip()


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = preset(args.preset or "quick")
    for item in args.overrides:
        cfg.set(*parse_override(item))
    return cfg


# What `fedeid evaluate --model` may still change: what is measured and on how many held-out
# patients (their images are drawn apart from the training patients', so these never touch the
# data the model was trained on). Everything else is the checkpoint's.
EVALUATION_KEYS = ("eval.", "data.test_patients", "train.device")


def evaluation_config(cfg: Config, args: argparse.Namespace) -> Config:
    """A checkpoint's config with the ``--set`` overrides an evaluation of it may apply.

    An override outside :data:`EVALUATION_KEYS`, or a ``--preset``, would describe another model
    than the one loaded; it is refused rather than silently ignored.
    """
    if args.preset is not None:
        raise InputError(args.model, f"--preset {args.preset} does not apply: the checkpoint's configuration is used")
    cfg = copy.deepcopy(cfg)
    for key, value in map(parse_override, args.overrides):
        if not key.startswith(EVALUATION_KEYS):
            raise InputError(args.model, f"--set {key}: with --model only {', '.join(EVALUATION_KEYS)}* can change; "
                                         "the checkpoint fixes the rest")
        cfg.set(key, value)
    return cfg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", description="Train the site's ReID network, then the MDL decoupler and the "
                                   "compensation decoder on the configured data (synthetic by default, "
                                   "or --set data.source=labels.csv), and save a DeIdentifier checkpoint.")
    add_config_args(p)
    p.add_argument("--out", required=True, type=Path, help="checkpoint file to write (.pt; must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--method", default="blocking", choices=METHODS,
                   help="blocking: method A (default); replace: method B, identity replacement with "
                        "synthetic identities (also makes counterfactuals)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("deid",
                       description="De-identify every PNG/JPEG/TIFF/NPY/DICOM image under IN (recursively) "
                                   "at --level and write 16-bit PNGs mirroring the tree under OUT: a.png -> "
                                   "a.png, a.jpg -> a.jpg.png (so a.png and a.jpg never share an output). "
                                   "Images keep their resolution. Blocked patches are synthesised and visible "
                                   "regions re-rendered (no pixel is copied above level 0); every run draws a "
                                   "fresh random seed, so two releases of one image are not alike. Bad "
                                   "files are reported and skipped; inputs are never modified. OUT must lie "
                                   "outside IN (and outside the folder of a single input file); a file in OUT "
                                   "that no fedeid run recorded in OUT/fedeid-manifest.json is never replaced "
                                   "without --overwrite. For DICOM in and DICOM out with header "
                                   "de-identification use `fedeid dicom deid`.")
    add_image_batch_args(p)
    p.add_argument("--model", required=True, type=Path, help="DeIdentifier checkpoint")
    p.add_argument("--reid", type=Path, help="this site's ReID checkpoint (for a global federated model)")
    p.add_argument("--prior", type=Path,
                   help="this site's identity prior (for a global federated method-B model: identity_prior.pt "
                        "in the site's state folder)")
    p.add_argument("--level", required=True, type=float,
                   help="privacy level in [0, 1]: fraction of patches blocked (method A), or how far the "
                        "identity moves towards a synthetic one (method B)")
    p.add_argument("--method", choices=METHODS,
                   help="expect this method's checkpoint (default: whichever --model holds)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images through the network at once (default 16; fewer when they are large)")
    p.set_defaults(func=cmd_deid)

    p = sub.add_parser("evaluate", description="Train fedeid centrally (or load --model), then measure re-identification "
                                   "(P@1, mAP@R, verification AUC, adaptive attacker), finding AUC (also "
                                   "retrained), SSIM and PSNR at every level for fedeid and the baselines "
                                   "(blur, pixelate, DP-Pix, blocking without compensation, no decoupler). "
                                   "Writes OUT/results.json and OUT/privacy_utility.png.")
    add_config_args(p)
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("--model", type=Path,
                   help="evaluate this checkpoint instead of training one (its configuration is used; --set may "
                        "change only eval.*, data.test_patients and train.device)")
    p.add_argument("--reid", type=Path, help="with a global federated --model: the site's ReID checkpoint")
    p.add_argument("--prior", type=Path, help="with a global federated method-B --model: the site's identity prior")
    p.set_defaults(func=cmd_evaluate)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_new_file(args.out, args.overwrite)  # before minutes of training, not after

    from fedeid.data.imageset import ImageSet
    from fedeid.data.loaders import load_dataset
    from fedeid.eval.benchmark import train_central

    from fedeid.audit import record

    sites, _ = load_dataset(cfg.data)
    if args.method == "replace":
        from fedeid.deid.replace import train_replace_deidentifier

        replace, summary = train_replace_deidentifier(ImageSet.concat(sites), cfg, progress=True)
        replace.save(args.out)
        record("model.release", model=args.out, mode="central", method="replace",
               num_examples=int(summary["training"]["num_examples"]))
        prior = summary["identity_prior"]
        print(f"saved {args.out} ({int(summary['training']['num_examples'])} images, "
              f"{summary['training']['train_seconds']:.0f} s; identity margin {prior['margin']:.3f}, at which "
              f"{100 * prior['tpr_at_margin']:.0f} % of a patient's own image pairs match; "
              f"{100 * prior['rejection_rate']:.1f} % of synthetic identities rejected)")
        return 0
    deidentifier, metrics = train_central(ImageSet.concat(sites), cfg, progress=True)
    deidentifier.save(args.out, extra={"training": metrics})
    record("model.release", model=args.out, mode="central", num_examples=int(metrics["num_examples"]))
    print(f"saved {args.out} ({int(metrics['num_examples'])} images, {metrics['train_seconds']:.0f} s)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise InputError(args.out, "exists and is not a folder; give a folder for the report")

    from fedeid.data.imageset import ImageSet
    from fedeid.data.loaders import load_dataset
    from fedeid.deid.pipeline import DeIdentifier
    from fedeid.eval.benchmark import evaluate_and_report, run_central_benchmark

    if (args.reid or args.prior) and not args.model:
        raise InputError(args.reid or args.prior, "goes with --model (a global federated checkpoint)")
    if args.model:
        deidentifier = DeIdentifier.load(args.model, reid=args.reid, prior=args.prior)
        cfg = evaluation_config(deidentifier.cfg, args)
        sites, test = load_dataset(cfg.data)
        evaluate_and_report(deidentifier, ImageSet.concat(sites), test, cfg, args.out)
    else:
        cfg = config_from_args(args)
        sites, test = load_dataset(cfg.data)
        run_central_benchmark(sites, test, cfg, args.out)
    return 0


def find_images(root: Path) -> list[Path]:
    """The images to de-identify; none at all is an error, not a successful empty run."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(root, "no such file or folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(root, f"no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}; for DICOM files "
                               "without a .dcm suffix use `fedeid dicom deid`)")
    return files


def output_name(rel: Path) -> Path:
    """Where ``rel``'s de-identified PNG goes: the input's relative path with its full name kept
    (``x.jpg`` -> ``x.jpg.png``; a PNG keeps its name), so ``x.png`` and ``x.jpg`` stay apart."""
    return rel if rel.suffix.lower() == ".png" else rel.with_name(rel.name + ".png")


def cmd_deid(args: argparse.Namespace) -> int:
    if not 0.0 <= args.level <= 1.0:
        raise ValueError(f"--level must lie in [0, 1], got {args.level}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")

    def build() -> tuple[Callable[[list[Any]], list[Any]], dict[str, Any]]:
        from fedeid.deid.native import deidentify_natives
        from fedeid.deid.pipeline import DeIdentifier
        from fedeid.eval.calibration import describe_level

        deidentifier = DeIdentifier.load(args.model, reid=args.reid, device=args.device, method=args.method,
                                         prior=args.prior)
        try:  # what the level bought on held-out patients, as measured when the model was evaluated
            print(describe_level(deidentifier.info.get("calibration"), args.level))
        except ValueError as exc:
            print(f"fedeid: {args.model}: calibration ignored: {exc}", file=sys.stderr)
        settings = {"level": args.level, "model_sha256": file_sha256(args.model),
                    "reid_sha256": file_sha256(args.reid) if args.reid else None,
                    **({"prior_sha256": file_sha256(args.prior)} if args.prior else {})}

        def release(images: list[Any]) -> list[Any]:
            return [out for out, _ in deidentify_natives(deidentifier, images, args.level, batch_size=len(images))]

        return release, settings

    done, kept, failed, manifest = transform_images(args, "deid", build, stage="de-identify",
                                                    batch_size=args.batch_size)
    again = f" ({kept} unchanged since the last run, kept)" if kept else ""
    print(f"de-identified {done + kept} image(s) at level {args.level:g}{again}; {failed} failed; "
          f"manifest: {manifest}")
    return batch_exit_code(done + kept, failed)


def transform_images(args: argparse.Namespace, kind: str,
                     build: Callable[[], tuple[Callable[[list[Any]], list[Any]], dict[str, Any]]], *,
                     stage: str, batch_size: int = 1) -> tuple[int, int, int, Path]:
    """Write ``fn(images)`` for every image under ``args.input`` as a 16-bit PNG under ``args.output``.

    The one batch loop of ``deid`` and ``counterfactual``: the output folder is checked (never
    inside an input, nothing replaced that fedeid did not write unless ``--overwrite``) before
    ``build()`` loads the model and returns ``fn`` (a list of images -> their results) with the
    run's settings (model hash, level); ``fn`` gets up to ``batch_size`` images at a time (and
    at most :data:`BATCH_PIXELS` pixels: native images can be large). A bad file is reported and
    the batch goes on — a batch whose ``fn`` call fails is retried image by image, so the bad
    image names itself; a rerun with the same settings keeps outputs of unchanged inputs; the
    run is recorded in the audit log. Returns (done, kept, failed, manifest path).
    """
    files = find_images(args.input)
    out = OutputFolder(args.output, [args.input], kind, overwrite=args.overwrite)
    fn, settings = build()

    import numpy as np
    from PIL import Image

    from fedeid.audit import record
    from fedeid.data.loaders import read_image
    from fedeid.progress import Progress

    out.resume(settings)
    base = args.input if args.input.is_dir() else args.input.parent
    done, kept, failed = 0, 0, 0
    pending: list[tuple[Path, Path, str, Path, Any]] = []  # (input, relative path, stamp, target, image)

    def fail(path: Path, rel: Path, exc: InputError | OSError) -> None:
        nonlocal failed
        error = exc if isinstance(exc, InputError) else InputError(path, f"cannot write its output: "
                                                                        f"{exc.strerror or exc}")
        progress.message(f"fedeid: {error}")
        out.record(str(rel), None, "failed", error.reason)
        failed += 1

    def flush() -> None:
        nonlocal done
        try:
            results: list[Any] | None = fn([item[4] for item in pending])
        except InputError:
            results = None  # one image of the batch is bad: find it, image by image
        for k, (path, rel, stamp, target, image) in enumerate(pending):
            try:
                result = results[k] if results is not None else fn([image])[0]
                pixels = np.round(result * 65535).astype(np.uint16)
                atomic_save(target, lambda fh, px=pixels: Image.fromarray(px).save(fh, format="PNG"))
            except (InputError, OSError) as exc:
                fail(path, rel, exc)
            else:
                out.record(str(rel), output_name(rel), "deidentified", stamp=stamp)
                done += 1
            finally:
                progress.update()
        pending.clear()

    with out, Progress(len(files), stage, "image", enabled=not args.no_progress) as progress:
        for path in files:
            rel = path.relative_to(base)
            try:
                stamp = file_stamp(path)
                if out.unchanged(str(rel), output_name(rel), stamp):
                    kept += 1
                    progress.update()
                    continue
                target = out.claim(output_name(rel), str(path))
                image = read_image(path)
            except (InputError, OSError) as exc:
                fail(path, rel, exc)
                progress.update()
                continue
            pending.append((path, rel, stamp, target, image))
            if len(pending) >= batch_size or sum(item[4].size for item in pending) >= BATCH_PIXELS:
                flush()
        flush()
    record(f"{kind}.images", inputs=files, model=args.model, **settings,
           outcome={"done": done, "kept": kept, "failed": failed})
    return done, kept, failed, out.manifest_path
