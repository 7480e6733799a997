"""``fedeid dicom ...``: de-identify DICOM folders, make a site secret.

Exit status of ``deid`` (the project's convention): 0 every file done (de-identified or skipped
with its reason); 1 some file failed or was refused (the rest are done, the manifest says which);
2 a usage error or nothing to do (an empty IN). Nothing here imports torch unless pixel mode is
asked for, so header-only runs start fast.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from fedeid.config import METHODS
from fedeid.dicom.pipeline import DEFAULT_MAX_BYTES, MANIFEST_NAME, DicomDeidentifier
from fedeid.dicom.profile import ProfileOptions
from fedeid.dicom.pseudonyms import Keyring, load_secret, new_secret_file
from fedeid.io import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dicom",
        help="de-identify DICOM: pixels by the model, headers by the PS3.15 Annex E profile",
        description="DICOM in, de-identified DICOM out.",
    )
    sub = parser.add_subparsers(dest="dicom_command", metavar="ACTION", required=True)

    deid = sub.add_parser(
        "deid",
        help="de-identify a folder of DICOM files into a mirrored folder",
        description=(
            "Read IN recursively (never modifying it; symlinks, pipes and devices are listed as skipped), "
            "write each de-identified file to OUT/<patient pseudonym>/<study UID>/<series UID>/<instance "
            "UID>.dcm (new identifiers only, nothing of the input names), and journal every file in the "
            "manifest (input paths as keyed hashes; --path-map keeps the table for the site). With --model and --level the pixels of each image go through "
            "the de-identification model (modalities it was not trained for and colour images are "
            "refused); without them only the header is de-identified (files with Burned In "
            "Annotation YES are then refused). Headers follow the Basic Application Level "
            "Confidentiality Profile of PS3.15 Annex E with the options chosen below."
        ),
    )
    deid.add_argument("input", metavar="IN", help="folder of DICOM files (any depth, any file names)")
    deid.add_argument("output", metavar="OUT", help="output folder (created; must be outside IN)")
    deid.add_argument("--model", metavar="CKPT", help="de-identification checkpoint: pixel mode")
    deid.add_argument("--level", type=float, help="privacy level in [0, 1] (pixel mode)")
    deid.add_argument("--method", choices=METHODS,
                      help="expect this method's checkpoint: blocking (method A) or replace (method B, "
                           "synthetic identity; every pixel generated at level > 0). Default: what --model holds")
    deid.add_argument(
        "--reid",
        metavar="CKPT",
        help="this site's ReID checkpoint, when --model is a global federated model without one",
    )
    deid.add_argument(
        "--prior",
        metavar="CKPT",
        help="this site's identity prior (identity_prior.pt in its state folder), when --model is a "
             "global federated method-B model without one",
    )
    deid.add_argument(
        "--secret-file",
        required=True,
        metavar="FILE",
        help="site secret keying UIDs, pseudonyms and date shifts (create with `fedeid dicom keygen`)",
    )
    deid.add_argument(
        "--retain-dates",
        choices=("full", "modified"),
        help="Retain Longitudinal Temporal Information: full dates, or dates shifted per patient",
    )
    deid.add_argument("--retain-patient-characteristics", action="store_true", help="keep age, sex, size, weight, ...")
    deid.add_argument("--retain-device-identity", action="store_true", help="keep device serial numbers, station names")
    deid.add_argument("--retain-institution-identity", action="store_true", help="keep institution name and address")
    deid.add_argument("--retain-uids", action="store_true", help="keep the original UIDs")
    deid.add_argument(
        "--clean-descriptors",
        action="store_true",
        help="keep descriptions and comments, cleaned of names, IDs, dates, UIDs and phone numbers",
    )
    deid.add_argument(
        "--clean-structured-content",
        action="store_true",
        help="keep SR content (Content/Acquisition Context Sequence) with its text cleaned, not replaced",
    )
    deid.add_argument(
        "--clean-graphics",
        action="store_true",
        help="keep graphic annotation text cleaned, not replaced (overlay planes are always removed)",
    )
    deid.add_argument(
        "--safe-private",
        metavar="CSV",
        help="Retain Safe Private: rows 'private creator,group hex,element hex' (e.g. 'ACME 1.1,0019,10')",
    )
    deid.add_argument("--manifest", metavar="PATH", help=f"manifest journal path (default OUT/{MANIFEST_NAME})")
    deid.add_argument(
        "--resume",
        action="store_true",
        help="skip the inputs the manifest already records as done (same key and options required)",
    )
    deid.add_argument(
        "--path-map",
        metavar="FILE",
        help="also write input hash -> input path (JSON lines, mode 600) to FILE, outside OUT, for the site",
    )
    deid.add_argument(
        "--max-mb",
        type=int,
        default=DEFAULT_MAX_BYTES >> 20,
        help="refuse files whose size, inflated size or decoded pixels exceed this many MiB (default %(default)s)",
    )
    deid.add_argument("--device", default="auto", help="torch device for the model (default auto)")
    deid.add_argument("--batch-size", type=int, default=16, help="frames per model batch")
    deid.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes for header-only mode (default: one per CPU); pixel mode uses one",
    )
    deid.add_argument("--no-progress", action="store_true", help="no progress bar")
    deid.set_defaults(func=_deid)

    keygen = sub.add_parser("keygen", help="create a site secret file (keep it off the outputs)")
    keygen.add_argument("path", metavar="FILE")
    keygen.set_defaults(func=_keygen)


def read_safe_private(path: str | Path) -> frozenset[tuple[str, int, int]]:
    """Parse a safe-private list; each row names one private element by creator and offset."""
    p = Path(path)
    entries = set()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(p, f"cannot read: {exc.strerror or exc}") from exc
    for n, row in enumerate(csv.reader(line for line in lines if line.strip() and not line.startswith("#")), 1):
        try:
            creator, group, element = (c.strip() for c in row)
            g, e = int(group, 16), int(element, 16)
        except ValueError as exc:
            raise InputError(p, f"row {n}: expected 'creator,group hex,element hex', got {row}") from exc
        if not g & 1 or not 0 <= e <= 0xFFFF:
            raise InputError(p, f"row {n}: group {group} is not a private (odd) group")
        entries.add((creator.upper(), g, e & 0xFF))
    return frozenset(entries)


def _deid(args: argparse.Namespace) -> int:
    options = ProfileOptions(
        retain_long_full_dates=args.retain_dates == "full",
        retain_long_modified_dates=args.retain_dates == "modified",
        retain_patient_characteristics=args.retain_patient_characteristics,
        retain_device_identity=args.retain_device_identity,
        retain_institution_identity=args.retain_institution_identity,
        retain_uids=args.retain_uids,
        clean_descriptors=args.clean_descriptors,
        clean_structured_content=args.clean_structured_content,
        clean_graphics=args.clean_graphics,
        safe_private=read_safe_private(args.safe_private) if args.safe_private else frozenset(),
    )
    for flag, value in (("--reid", args.reid), ("--prior", args.prior)):
        if value is not None and args.model is None:
            raise ValueError(f"{flag} goes with --model (pixel mode)")
    if (args.model is None) != (args.level is None):
        raise ValueError("pixel mode needs both --model and --level; leave both out for header-only mode")
    keyring = Keyring(load_secret(args.secret_file))
    model = None
    if args.model is not None:
        from fedeid.deid.pipeline import DeIdentifier

        model = DeIdentifier.load(args.model, reid=args.reid, device=args.device, method=args.method,
                                  prior=args.prior)
    if args.max_mb < 1:
        raise ValueError("--max-mb must be at least 1")
    runner = DicomDeidentifier(
        options, keyring, model=model, level=args.level, batch_size=args.batch_size, max_bytes=args.max_mb << 20
    )
    summary = runner.run(
        args.input,
        args.output,
        manifest=args.manifest,
        progress=not args.no_progress and sys.stderr.isatty(),
        workers=args.workers,
        resume=args.resume,
        path_map=args.path_map,
    )
    for record in summary.records:
        if record.status in ("refused", "failed"):
            # The operator's terminal names the input (the site's own path); the manifest does not.
            print(f"fedeid: {record.path}: {record.status}: {record.reason}", file=sys.stderr)
    print(summary.line())
    from fedeid.audit import record
    record("deid.dicom", inputs=args.input, model=args.model, level=args.level, mode=runner.mode,
           options=options.to_dict(), counts=summary.counts)
    print(f"manifest: {args.manifest or Path(args.output) / MANIFEST_NAME}")
    if not summary.records and not summary.resumed:
        print(f"fedeid: {args.input}: no files to de-identify", file=sys.stderr)
        return 2
    return 1 if summary.counts["failed"] or summary.counts["refused"] else 0


def _keygen(args: argparse.Namespace) -> int:
    new_secret_file(args.path)
    print(f"site secret written to {args.path} (mode 600); keep it apart from de-identified outputs")
    return 0
