"""The descriptor cleaner: erase a patient's identifiers from free text a site chose to keep.

Under *Clean Descriptors*, *Clean Structured Content* and *Clean Graphics* the profile keeps
descriptions, report text and annotation labels, so whatever identifies the patient inside them
must go. Two kinds of rule do that, and both replace whole tokens (``Johnny`` stays when the
patient is ``John``; a name is never left half-erased):

* **This dataset's own values.** Every person name, identifier, date and UID anywhere in the
  dataset tree (sequences and private blocks included) is collected. Names are split on every
  separator (``^ = - , .`` and spaces) and compared case- and diacritic-folded (NFKD, so
  ``MÜLLER`` matches ``Muller``); names in CJK scripts are matched as substrings, whole and by
  component, with no minimum length (``王`` is a complete family name). Identifiers also match
  inside longer tokens (``MRN0012345``).
* **Patterns, whoever they belong to.** Dates in the common written forms (``YYYYMMDD``,
  ``DD.MM.YYYY``, ``DD/MM/YYYY``, ``MM/DD/YYYY``, ``YYYY-MM-DD``, ``1991年8月5日``, month names in
  English, German and French), anything shaped like a UID and digit runs shaped like phone or
  record numbers (7+ digits) are erased even when they are not this patient's: a relative's
  birth date or another hospital's MRN is PHI too.

Limits, stated plainly: a name that appears in the text but in no attribute of the file (a
relative, a physician only mentioned in the report) is not found unless it matches a pattern;
a name misspelled in the text is not found; single Latin letters (initials) are not erased.
Microsoft Presidio was evaluated as the alternative: it needs a spaCy language model, which is
not on PyPI from its authors and may not be downloaded at run time here, and its recognisers
are English-centred (no CJK names); the rules above use what the file itself says about the
patient, which is what a recogniser would have to guess.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

MARK = "***"

# Identifier attributes whose values are erased wherever they recur (besides every PN, DA, DT, UI).
IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "MilitaryRank",
        "BranchOfService",
        "MedicalRecordLocator",
        "AccessionNumber",
        "StudyID",
        "AdmissionID",
        "ServiceEpisodeID",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "PerformedProcedureStepID",
        "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberImagingServiceRequest",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "ClinicalTrialSubjectID",
        "ClinicalTrialSubjectReadingID",
        "LocalNamespaceEntityID",
        "UniversalEntityID",
        "PersonTelephoneNumbers",
        "PersonAddress",
    }
)

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_SEPARATORS = re.compile(r"[^\w]+|_")
_WORD = re.compile(r"\w+")
_UID = re.compile(r"\b\d+(?:\.\d+){2,}\b")
_PHONE = re.compile(r"\+?\d(?:[\s\-/().]{0,2}\d){6,}")
_MONTHS = (
    "january|february|march|april|may|june|july|august|september|october|november|december|"
    "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|"
    "januar|februar|märz|maerz|mai|juni|juli|oktober|dezember|"
    "janvier|février|fevrier|mars|avril|juin|juillet|août|aout|septembre|octobre|novembre|décembre|decembre"
)
_DAY = r"(?:0?[1-9]|[12]\d|3[01])"
_MONTH = r"(?:0?[1-9]|1[0-2])"
_YEAR = r"(?:1[89]\d\d|20\d\d)"
_DATES = re.compile(
    "|".join(
        (
            rf"\b{_YEAR}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b",  # 19580317
            rf"\b{_YEAR}[-/.]{_MONTH}[-/.]{_DAY}\b",  # 1958-03-17, 1958/3/17
            rf"\b{_DAY}[./-]{_MONTH}[./-](?:{_YEAR}|\d\d)\b",  # 17.03.1958, 17/03/58
            rf"\b{_MONTH}[./-]{_DAY}[./-](?:{_YEAR}|\d\d)\b",  # 03/17/1958
            r"\d{2,4}\s*年\s*\d{1,2}\s*月(?:\s*\d{1,2}\s*日)?",  # 1991年8月5日
            rf"\b{_DAY}(?:st|nd|rd|th)?\.?\s+(?:{_MONTHS})\.?,?\s+{_YEAR}\b",  # 17 March 1958, 17. März 1958
            rf"\b(?:{_MONTHS})\.?\s+{_DAY}(?:st|nd|rd|th)?,?\s+{_YEAR}\b",  # March 17, 1958
            rf"\b(?:{_MONTHS})\.?\s+{_YEAR}\b",  # March 1958
        )
    ),
    re.IGNORECASE,
)
_FOLD = str.maketrans({"ø": "o", "ł": "l", "đ": "d", "æ": "ae", "œ": "oe", "þ": "th", "ð": "d", "ı": "i"})


def fold(text: str) -> str:
    """Case- and diacritic-folded text: ``Müller``, ``MULLER`` and ``Muller`` fold alike."""
    decomposed = unicodedata.normalize("NFKD", text.casefold().translate(_FOLD))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).translate(_FOLD)


def values_of(value: Any) -> list[Any]:
    """An element's values as a list (none, one, or a multi-value), for code that walks them."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


@dataclass
class Identifiers:
    """What a dataset says about its patient and people, as text to erase."""

    names: set[str] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)
    uids: set[str] = field(default_factory=set)

    def tokens(self) -> Iterator[str]:
        """Every value and every part of it, for searching outputs and paths."""
        for value in self.names | self.ids:
            yield value
            yield from (p for p in _SEPARATORS.split(value) if p)
        yield from self.dates
        yield from self.uids


def collect(ds: Dataset) -> Identifiers:
    """Identifiers of every element of the tree: PN, DA/DT and UI values by VR, and the values of
    the identifying attributes (``IDENTIFYING_KEYWORDS``) by name."""
    found = Identifiers()
    for elem in _walk(ds):
        vr = elem.VR
        try:
            values = [str(v).strip() for v in values_of(elem.value)]
        except Exception:  # a value that does not decode: nothing usable to collect from it
            continue
        values = [v for v in values if v]
        if vr == "PN":
            found.names.update(values)
        elif vr in ("DA", "DT"):
            found.dates.update(v[:8] for v in values)
        elif vr == "UI":
            found.uids.update(v.rstrip("\x00") for v in values)
        elif elem.keyword in IDENTIFYING_KEYWORDS:
            found.ids.update(values)
    return found


def _walk(ds: Dataset) -> Iterator[Any]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from _walk(item)
        else:
            yield elem


class Scrubber:
    """Erases one dataset's identifiers and every date/UID/phone pattern from text."""

    def __init__(self, found: Identifiers) -> None:
        words: set[str] = set()
        cjk: set[str] = set()
        digit_runs: set[str] = set()
        for value in found.names | found.ids:
            parts = [p for p in re.split(r"[\^=]", value) if p.strip()]
            for piece in [value, *parts, *_SEPARATORS.split(value)]:
                piece = piece.strip()
                if not piece:
                    continue
                if _CJK.search(piece):
                    cjk.add(re.sub(r"\s+", "", piece))
                    cjk.update(p for p in _SEPARATORS.split(piece) if p)
                elif len(piece) >= 2 and _WORD.fullmatch(piece):
                    words.add(fold(piece))
            digit_runs.update(d for d in re.findall(r"\d{4,}", value))
        for value in found.uids:
            words.add(value)
        self._words = frozenset(words)
        self._digits = tuple(sorted(digit_runs, key=len, reverse=True))
        self._cjk = (
            re.compile("|".join(re.escape(c) for c in sorted(cjk, key=len, reverse=True))) if cjk else None
        )

    def __call__(self, text: str) -> str:
        text = _UID.sub(MARK, text)
        text = _DATES.sub(MARK, text)
        text = _PHONE.sub(MARK, text)
        if self._cjk is not None:
            text = self._cjk.sub(MARK, text)
        return _WORD.sub(self._token, text)

    def _token(self, m: re.Match[str]) -> str:
        token = m.group(0)
        if fold(token) in self._words:
            return MARK
        if any(c.isdigit() for c in token) and any(d in token for d in self._digits):
            return MARK
        return token

