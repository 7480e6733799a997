"""``fedeid counterfactual``: the same patient with another finding (method B).

Imports stay light at module level (no torch): ``fedeid --help`` loads every command module.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("counterfactual", help="the same patient with another finding (method-B model)",
                       description="For every PNG/JPEG/TIFF/NPY/DICOM image under IN, set the given findings "
                                   "in the medical vector of a method-B model (fedeid train --method replace), "
                                   "keep its identity and residual vectors, and write the change, added to the "
                                   "original, as 16-bit PNGs mirroring the tree under OUT. Bad files are "
                                   "reported and skipped; inputs are never modified.")
    p.add_argument("input", type=Path, help="folder (or single file) of images")
    p.add_argument("output", type=Path, help="output folder")
    p.add_argument("--model", required=True, type=Path, help="method-B (replace) checkpoint")
    p.add_argument("--set-finding", dest="findings", action="append", required=True, metavar="NAME=0|1",
                   help="finding to set, e.g. cardiomegaly=0 (repeatable)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_counterfactual)


def cmd_counterfactual(args: argparse.Namespace) -> int:
    from fedeid.commands import transform_images
    from fedeid.deid.pipeline import DeIdentifier
    from fedeid.deid.replace import parse_findings

    model = DeIdentifier.load(args.model, device=args.device, method="replace")
    targets = parse_findings(args.findings, model.findings)
    done, failed = transform_images(args.input, args.output, lambda image: model.counterfactual_native(image, targets),
                                    desc="counterfactual")
    setting = ", ".join(f"{k}={v}" for k, v in targets.items())
    print(f"wrote {done} counterfactual(s) with {setting}; {failed} failed")
    return 0 if failed == 0 else 1
