"""A byte-level search of de-identified DICOM outputs for the identifiers of their inputs.

The header profile decides what to remove; this checks what is *left*, independently of how:
every identifying value of every input header (names and their components, IDs, accession
numbers, institution, dates of birth, every non-class UID — what
:func:`fedeid.dicom.profile.collect_identifiers` collects, plus UIDs) is searched for in the raw
bytes of every output file, headers and all. Short all-digit values are searched only outside
binary elements (pixel data holds any 4-digit run by chance). The result is counts only — the
report never repeats an identifier. The limit: it finds what the input headers name; a name
typed only into free text or burned into pixels of the input is not in that list.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

BINARY_VRS = ("OB", "OW", "OD", "OF", "OL", "OV", "UN")


def _uids(ds: Any, class_tags: frozenset[int]) -> set[str]:
    from pydicom.uid import UID_dictionary

    found: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.tag not in class_tags:
            for v in [elem.value] if isinstance(elem.value, str) else list(elem.value or []):
                v = str(v).strip().rstrip("\x00")
                if len(v) >= 8 and v not in UID_dictionary:
                    found.add(v)
    return found


def input_identifiers(in_dir: Path) -> set[bytes]:
    import pydicom

    from fedeid.dicom.profile import CLASS_UID_TAGS
    from fedeid.dicom.scrub import collect

    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in sorted(in_dir.rglob("*")):
            if not p.is_file():
                continue
            try:
                ds = pydicom.dcmread(p, force=True)
                ident = collect(ds)  # names, identifiers (whole and by part) and dates; UIDs below, sans class UIDs
                found |= {s for s in ident.tokens() if len(s) >= 4} - ident.uids
                found |= _uids(ds, CLASS_UID_TAGS) | _uids(getattr(ds, "file_meta", []), CLASS_UID_TAGS)
            except Exception:  # an unreadable input contributes nothing; the batch itself refused it
                continue
    return {s.encode(errors="replace") for s in found}


def scan(in_dir: str | Path, out_dir: str | Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Counts of input identifiers found in output bytes; ``skip`` names files not to scan (the manifest)."""
    import pydicom

    identifiers = input_identifiers(Path(in_dir))
    files = [p for p in sorted(Path(out_dir).rglob("*")) if p.is_file() and p.name not in skip]
    hits, hit_files = 0, 0
    for path in files:
        data = path.read_bytes()
        text_only = data
        try:
            for elem in pydicom.dcmread(path, force=True).iterall():
                if elem.VR in BINARY_VRS and isinstance(elem.value, bytes) and len(elem.value) >= 8:
                    text_only = text_only.replace(elem.value, b"")
        except Exception:  # not parseable as DICOM: every byte is searched
            pass
        n = sum(v in (text_only if v.replace(b".", b"").isdigit() else data) for v in identifiers)
        hits += n
        hit_files += n > 0
    result = ("no identifier of any input found in any output" if hits == 0 else
              f"{hits} identifier occurrence(s) found in {hit_files} output file(s): DO NOT RELEASE")
    return {"identifiers_searched": len(identifiers), "outputs_scanned": len(files), "hits": hits,
            "files_with_hits": hit_files, "result": result}
