"""The report's JSON: measured figures plus provenance, DICOM batch, audit quotes and the words.

:func:`build` assembles it; :func:`write` writes ``report.json``, ``report.html`` and the detached
signature ``report.sig`` and records the issue in the audit log; :func:`verify` checks a signed
report folder. The verdict thresholds (P@1 within 2× / 5× chance) are a reading aid for the
officer, not a legal standard; the figures are what the decision rests on.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

from fedeid import __version__
from fedeid.audit import keys
from fedeid.audit.log import AuditLog, file_sha256, record
from fedeid.io import InputError, atomic_write_bytes

FILES = ("report.json", "report.html")
SIGNATURE = "report.sig"
SIGNATURE_FORMAT = "fedeid-report-signature/1"


def provenance(model_path: Path, reid_path: Path | None, prior_path: Path | None = None) -> dict[str, Any]:
    """What the checkpoint says of its own training: central, or federated with rounds, sites and ε;
    the hashes of the model and of the site part it was used with (ReID network or identity prior)."""
    from fedeid.checkpoint import load_checkpoint

    extra = load_checkpoint(model_path)["extra"]
    out: dict[str, Any] = {"sha256": file_sha256(model_path), "mode": "central",
                           "reid_sha256": file_sha256(reid_path) if reid_path else None,
                           "prior_sha256": file_sha256(prior_path) if prior_path else None}
    fed = extra.get("federated")
    if fed:
        summary = fed.get("summary", {})
        central, local = summary.get("central_dp") or {}, summary.get("local_dp") or {}
        per_site = local.get("per_site_epsilon", {})
        out["mode"] = "federated"
        out["federated"] = {
            "rounds": fed.get("rounds"),
            "sites": sorted(per_site) if per_site else None,
            "central_epsilon": (f"{central['epsilon']:.3f} (δ = {central['delta']:g}, {central['releases']} releases)"
                                if central else None),
            "local_epsilon": per_site,
        }
    elif "training" in extra:
        out["training"] = {k: v for k, v in extra["training"].items() if isinstance(v, (int, float))}
    return out


def dicom_section(manifest_path: Path, dicom_input: Path | None) -> dict[str, Any]:
    """The batch's profile, options and counts from its manifest, and a PHI scan of its outputs."""
    from fedeid.riskreport.phiscan import scan

    from fedeid.dicom.pipeline import read_manifest

    try:  # the batch's journal: its last run's header and the latest row of every input
        manifest = read_manifest(manifest_path)
        run = manifest["runs"][-1]
        section = {k: run[k] for k in ("mode", "level", "profile", "options")}
        section["counts"] = manifest["counts"]
        section["complete"] = manifest["complete"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise InputError(manifest_path, f"not a fedeid DICOM manifest ({exc})") from exc
    section["phi_scan"] = (scan(dicom_input, manifest_path.parent, skip=(manifest_path.name,)) if dicom_input else
                           {"result": "not run: give --dicom-input (the batch's input folder) to scan the outputs"})
    return section


def audit_section(state: Path | None, hashes: set[str], dicom_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """The log's state, and the entries the report rests on — those naming this model, and the DICOM
    batch's (same counts) — each with its inclusion proof in the latest checkpoint when it has one."""
    log = AuditLog(state)
    verified = log.verify()
    cps = log.checkpoints()
    cp = cps[-1] if cps else None
    quoted = []
    entries = log.entries() if verified["ok"] else []
    for e in entries:
        batch = e["kind"] == "deid.dicom" and dicom_counts is not None and e["data"].get("counts") == dicom_counts
        if e["data"].get("model_sha256") in hashes or batch:
            q = {k: e[k] for k in ("seq", "kind", "time", "hash")}
            if cp is not None and e["seq"] < int(cp["size"]):
                q["inclusion_proof"] = log.inclusion(e["seq"], cp)
            quoted.append(q)
    return {"verify": {k: verified[k] for k in ("ok", "entries", "checkpoints", "problems", "head")},
            "checkpoint": {k: cp[k] for k in ("size", "root", "time", "signatures")} if cp else None,
            "entries": quoted}


# what each attacker of fedeid.eval.attackers is, in an officer's words
ATTACKER_WORDS = {
    "learned": "learned — a re-identification network trained on originals of known patients",
    "adaptive": "adaptive — that network retrained on images de-identified the same way, to learn what survives",
    "keypoint": "keypoint — local anatomical features matched geometrically (classic image matching)",
    "patch": "patch — normalised correlation of image patches",
    "foundation": "foundation — retrieval with frozen foundation-model features, known to re-identify on their own",
    "foundation_tuned": "foundation_tuned — those features with a projection tuned on known patients",
    "model_holder": "model holder — someone holding this model, who de-identifies the archive too to compare "
                    "like with like",
    "fusion": "fusion — the attackers' scores combined (standardised and summed), so that what each one "
              "finds on different images adds up",
}


def verdict(risk: dict[str, Any]) -> dict[str, str]:
    w = risk["attackers"][risk["worst_attacker"]]
    p1, chance = w["after"]["p_at_1"], risk["chance_p_at_1"]
    ratio = (p1["value"] or 0.0) / chance
    cls = "low" if ratio <= 2 else "medium" if ratio <= 5 else "high"
    return {"class": cls,
            "headline": f"Worst-case re-identification after de-identification: P@1 {p1['value']:.3f} "
                        f"[{p1['low']:.3f}–{p1['high']:.3f}] by the {risk['worst_attacker']} attacker, "
                        f"{ratio:.1f}× chance ({chance:.3f}).",
            "detail": f"On the originals the same attacker reaches P@1 {w['before']['p_at_1']['value']:.3f}. "
                      f"Risk reading: {cls} (low: within 2× chance; medium: within 5×; high: beyond)."}


def threat_model(risk: dict[str, Any]) -> list[str]:
    return [
        "The attacker holds an archive of original chest radiographs with names attached (a hospital's "
        "PACS, an earlier study, a leaked data set) and obtains the de-identified images fedeid released. "
        "They try to find, for each released image, the person in their archive.",
        "They use every attacker of the suite: " + "; ".join(ATTACKER_WORDS.get(n, n) for n in risk["attackers"]) + ".",
        "They also try to infer attributes (the hospital and scanner of origin) from the released pixels, "
        "and to single out individuals whose image stands apart from every other.",
        "Out of scope: an attacker holding the site's keys or the original images of the released patients "
        "together with their acquisition links; DICOM header identifiers are handled by the header profile (see the "
        "DICOM section when a batch is reported).",
    ]


def residual(risk: dict[str, Any]) -> list[str]:
    w = risk["attackers"][risk["worst_attacker"]]["after"]
    return [
        f"Under the strongest attacker measured, {100 * w['p_at_1']['value']:.1f} % of released images are linked "
        f"to the right patient at rank one (95 % CI {100 * w['p_at_1']['low']:.1f}–{100 * w['p_at_1']['high']:.1f} %), "
        f"and a threshold letting through 1 % of wrong pairs links {100 * (w['tpr_at_fpr_1e-2']['value'] or 0):.1f} % "
        "of right pairs.",
        "These figures hold for attackers no stronger than those measured, on data like the test patients "
        f"({risk['data']['test_patients']} held out); a stronger attacker may do better. The intervals reflect "
        "patient sampling only, not the choice of attackers.",
    ]


def conditions(level: float, method: str) -> list[str]:
    return [
        f"Release only images de-identified by this model (checkpoint hash above) with method '{method}' at "
        f"level {level:g} or higher.",
        "Never release the original images, the site ReID checkpoint, or the site's keys with the de-identified images.",
        "Release DICOM only after the header profile ran and the PHI scan found nothing.",
        "Recipients agree not to attempt re-identification or linkage with other data.",
    ]


def build(risk: dict[str, Any], model: dict[str, Any], audit: dict[str, Any], *, method: str,
          dicom: dict[str, Any] | None = None, reassess_months: int = 12, subject: str = "") -> dict[str, Any]:
    today = _dt.datetime.now(_dt.timezone.utc).date()
    return {
        "format": "fedeid-risk-report/1",
        "fedeid_version": __version__,
        "issued": today.isoformat(),
        "reassess_by": (today + _dt.timedelta(days=round(30.44 * reassess_months))).isoformat(),
        "subject": subject or f"method {method} at level {risk['level']:g}",
        "method": method,
        "verdict": verdict(risk),
        "threat_model": threat_model(risk),
        "risk": risk,
        "model": model,
        "dicom": dicom,
        "audit": audit,
        "conditions": conditions(risk["level"], method),
        "residual_risk": residual(risk),
    }


def write(report: dict[str, Any], out_dir: Path, key_path: Path, state: Path | None = None) -> dict[str, Path]:
    """Write JSON + HTML, sign both, and record the issue in the audit log."""
    from fedeid.riskreport.render import render

    key = keys.load_private_key(key_path)
    report = {**report, "signed_by": keys.fingerprint(key.public_key())}
    data = {"report.json": json.dumps(report, indent=2, allow_nan=False).encode() + b"\n",
            "report.html": render(report).encode()}
    for name, blob in data.items():
        atomic_write_bytes(out_dir / name, blob)
    digests = {name: hashlib.sha256(blob).hexdigest() for name, blob in data.items()}
    sig = {"format": SIGNATURE_FORMAT, "files": digests, "signature": keys.sign(key, keys.canonical(digests))}
    atomic_write_bytes(out_dir / SIGNATURE, json.dumps(sig, indent=2).encode() + b"\n")
    record("report.issued", state=state, report_sha256=digests, model_sha256=report["model"]["sha256"],
           signer=sig["signature"]["fingerprint"])
    return {name: out_dir / name for name in (*FILES, SIGNATURE)}


def verify(folder: Path, trusted: list[str] | None = None) -> str:
    """The signer's fingerprint if ``report.json`` and ``report.html`` are exactly what was signed."""
    sig_path = folder / SIGNATURE
    try:
        sig = json.loads(sig_path.read_text())
        digests = sig["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(sig_path, f"no readable signature ({exc})") from exc
    if sig.get("format") != SIGNATURE_FORMAT or set(digests) != set(FILES):
        raise InputError(sig_path, "not a fedeid report signature")
    try:
        signer = keys.verify(sig["signature"], keys.canonical(digests), trusted)
    except ValueError as exc:
        raise InputError(sig_path, str(exc)) from exc
    for name in FILES:
        if file_sha256(folder / name) != digests[name]:
            raise InputError(folder / name, "changed since it was signed")
    return signer
