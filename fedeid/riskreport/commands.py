"""``fedeid report``: measure, write and sign the risk report; ``fedeid report verify``: check one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedeid.io import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="the signed re-identification risk report a privacy officer reviews (HTML + JSON)",
        description="Measure re-identification risk before (originals) and after de-identification under every "
                    "attacker of the suite, the WP29 criteria, utility and quality, with bootstrap intervals over "
                    "patients; add the model's training provenance (ε per site for federated models), an optional "
                    "DICOM batch with a PHI scan of its outputs, and the audit-log entries it relies on. Writes "
                    "OUT/report.html, OUT/report.json and the detached Ed25519 signature OUT/report.sig. "
                    "`fedeid report verify OUT` checks the signature.")
    p.add_argument("--model", type=Path, help="de-identification checkpoint (central, or a federated global.pt)")
    p.add_argument("--reid", type=Path, help="this site's ReID checkpoint, for a federated global model (method A)")
    p.add_argument("--prior", type=Path,
                   help="this site's identity prior, for a federated global method-B model (identity_prior.pt)")
    p.add_argument("--level", type=float, help="the privacy level (method B: strength) to be released, in [0, 1]")
    p.add_argument("--method", help="what to report on: the model's own method (default: fedeid for method A, "
                                    "replace for method B), block, or a configured baseline")
    p.add_argument("--data", help="labels CSV (or folder) of images with patient ids; default: the model's data config")
    p.add_argument("--attackers", help="comma-separated subset of the suite (default: every attacker)")
    p.add_argument("--key", type=Path, help="the site's Ed25519 signing key (`fedeid audit keygen`)")
    p.add_argument("--out", type=Path, help="report folder")
    p.add_argument("--dicom-manifest", type=Path, help="manifest of a `fedeid dicom deid` batch to report on")
    p.add_argument("--dicom-input", type=Path, help="that batch's input folder, for the PHI scan of its outputs")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples of patients (default 500)")
    p.add_argument("--reassess-months", type=int, default=12, help="re-assessment due after this many months")
    p.add_argument("--state-dir", type=Path, help="the site's state folder holding the audit log")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_report)
    sub = p.add_subparsers(dest="report_action", metavar="ACTION")
    v = sub.add_parser("verify", help="check a report folder's signature; exit 1 if anything changed")
    v.add_argument("folder", type=Path)
    v.add_argument("--trust", action="append", metavar="PUB|FINGERPRINT", help="accept only these signers")
    v.set_defaults(func=_verify)


def make_report(model: Path, level: float, out: Path, key: Path, *, method: str | None = None,
                reid: Path | None = None, prior: Path | None = None, data: str | None = None,
                attackers: tuple[str, ...] | None = None, bootstrap: int = 500,
                dicom_manifest: Path | None = None, dicom_input: Path | None = None, reassess_months: int = 12,
                state: Path | None = None, device: str = "auto", progress: bool = True,
                suite_factory: Callable[..., Any] | None = None) -> dict[str, Path]:
    """Everything ``fedeid report`` does; ``suite_factory`` defaults to the evaluator's AttackSuite."""
    from fedeid.audit import keys
    from fedeid.data.imageset import ImageSet
    from fedeid.data.loaders import load_dataset
    from fedeid.deid.pipeline import DeIdentifier
    from fedeid.eval.benchmark import method_name, methods_for
    from fedeid.riskreport import document
    from fedeid.riskreport.measure import assess

    if not 0.0 <= level <= 1.0:
        raise ValueError(f"--level must lie in [0, 1], got {level}")
    if bootstrap < 20:  # a 95 % percentile interval from fewer resamples is mostly the extremes
        raise ValueError(f"--bootstrap must be at least 20, got {bootstrap}")
    keys.load_private_key(key)  # a bad key fails now, not after minutes of measuring
    deidentifier = DeIdentifier.load(model, reid=reid, prior=prior, device=device)
    method = method or method_name(deidentifier)
    cfg = deidentifier.cfg
    if data is not None:
        cfg.data.source = data
    methods = methods_for(deidentifier, cfg)
    if method not in methods:
        raise ValueError(f"--method {method!r} is not one of {', '.join(methods)}")
    sites, test = load_dataset(cfg.data)
    train = ImageSet.concat(sites)
    if suite_factory is None:
        from fedeid.eval.attackers import AttackSuite as suite_factory
    suite = suite_factory(train, test, cfg, progress=progress, attackers=attackers)
    risk = assess(suite, methods[method], level, train, test, cfg, bootstrap=bootstrap, seed=cfg.data.seed,
                  progress=progress)
    prov = document.provenance(model, reid, prior)
    dicom = document.dicom_section(dicom_manifest, dicom_input) if dicom_manifest else None
    hashes = {prov["sha256"], prov.get("reid_sha256"), prov.get("prior_sha256")} - {None}
    audit = document.audit_section(state, hashes,
                                   dicom["counts"] if dicom else None)
    report = document.build(risk, prov, audit, method=method, dicom=dicom, reassess_months=reassess_months)
    return document.write(report, out, key, state)


def _report(args: argparse.Namespace) -> int:
    missing = [f"--{n}" for n in ("model", "level", "key", "out") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"fedeid report needs {', '.join(missing)}")
    paths = make_report(args.model, args.level, args.out, args.key, method=args.method, reid=args.reid,
                        prior=args.prior,
                        data=args.data, attackers=tuple(a for a in args.attackers.split(",") if a) if args.attackers
                        else None, bootstrap=args.bootstrap, dicom_manifest=args.dicom_manifest,
                        dicom_input=args.dicom_input, reassess_months=args.reassess_months, state=args.state_dir,
                        device=args.device)
    print(f"report: {paths['report.html']}  figures: {paths['report.json']}  signature: {paths['report.sig']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from fedeid.audit.commands import trusted
    from fedeid.riskreport.document import verify

    try:
        signer = verify(args.folder, trusted(args.trust))
    except InputError as exc:
        print(f"fedeid: {exc}", file=sys.stderr)
        print("INVALID: the report is not what was signed")
        return 1
    print(f"OK: report.json and report.html are as signed by {signer}")
    return 0
