"""``fedeid counterfactual``: the same patient with another finding (method B).

Imports stay light at module level (no torch): ``fedeid --help`` loads every command module.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from fedeid.commands import add_image_batch_args

    p = sub.add_parser("counterfactual", help="the same patient with another finding (method-B model)",
                       description="For every PNG/JPEG/TIFF/NPY/DICOM image under IN, set the given findings "
                                   "in the medical vector of a method-B model (fedeid train --method replace), "
                                   "keep its identity and residual vectors, and write the change, added to the "
                                   "original, as 16-bit PNGs mirroring the tree under OUT. Bad files are "
                                   "reported and skipped; inputs are never modified.")
    add_image_batch_args(p)
    p.add_argument("--model", required=True, type=Path, help="method-B (replace) checkpoint")
    p.add_argument("--set-finding", dest="findings", action="append", required=True, metavar="NAME=0|1",
                   help="finding to set, e.g. cardiomegaly=0 (repeatable)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_counterfactual)


def cmd_counterfactual(args: argparse.Namespace) -> int:
    from fedeid.commands import transform_images
    from fedeid.io import batch_exit_code, file_sha256

    targets: dict[str, int] = {}

    def build():  # after the output folder is checked: loading the model is the slow part
        from fedeid.deid.pipeline import DeIdentifier
        from fedeid.deid.replace import parse_findings

        model = DeIdentifier.load(args.model, device=args.device, method="replace")
        targets.update(parse_findings(args.findings, model.findings))
        settings = {"findings": sorted(args.findings), "model_sha256": file_sha256(args.model)}
        return (lambda images: [model.counterfactual_native(image, targets) for image in images]), settings

    done, kept, failed, manifest = transform_images(args, "counterfactual", build, stage="counterfactual")
    setting = ", ".join(f"{k}={v}" for k, v in targets.items())
    print(f"wrote {done + kept} counterfactual(s) with {setting}; {failed} failed; manifest: {manifest}")
    return batch_exit_code(done + kept, failed)
