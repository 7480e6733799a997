"""The Basic Application Level Confidentiality Profile of DICOM PS3.15 Annex E, with its options.

The attribute table is data (``annex_e.csv``, one row per attribute of Table E.1-1 with the Basic
Profile action and one column per option), so keeping up with a new release of the standard is a
data change. This module resolves, once per set of options, each row to one concrete action and
then walks datasets, sequences included, applying them:

* ``D`` (and ``Z/D``, ``X/D``, ``X/Z/D``): replace with a dummy of the right VR; UIDs get their keyed
  replacement, Patient ID its keyed pseudonym, sequences are kept and their items cleaned.
  Choosing D where the table allows it keeps Type 1 attributes present, so outputs stay valid.
* ``Z``: zero length (sequences: no items). Patient's Name takes the pseudonym, which ``Z``
  allows ("or a dummy value consistent with the VR") and which keeps names linkable.
* ``X/Z``: zero length, except that a sequence is removed (an empty Type 3 sequence is invalid)
  unless it is one of the Type 2 ones (``TYPE2_XZ_SEQUENCES``).
* ``X``: remove. ``K``: keep. ``U``: keyed UID replacement (consistent across files and runs).
* ``X/Z/U*``: keep the sequence; the UIDs inside are replaced by their own rows.
* ``C``: dates under *Modified Dates* shift by the patient's keyed offset (times unchanged);
  text goes through the descriptor cleaner (``scrub.py``: every name, ID, date and UID of the
  whole dataset tree, and date/UID/phone patterns, erased as whole tokens); sequences are kept
  and cleaned.

Containers are honoured: a sequence whose action is D or C (Content Sequence, Graphic Annotation
Sequence, Acquisition Context Sequence) passes that action to every item element that has no row
of its own and is not safe-listed, so SR ``TextValue`` under Content Sequence is replaced by a
dummy in the Basic Profile and cleaned under *Clean Structured Content* (likewise graphic text
under *Clean Graphics*, and rows whose D would replace text are cleaned instead).

Beyond the table: a public attribute with no row is kept only if ``safe_attributes.csv`` lists it
(pixel, geometry, technique, code and SR-structure attributes) or is a dictionary attribute of
a VR that holds no free text (numbers, tags, code strings: ``_CODED_VRS``); otherwise it is
removed (PN, text, dates and binary blobs included; a tag no dictionary knows included), except
the few Type 1/2 text attributes an IOD cannot lose (``REQUIRED_TEXT_TAGS``: replaced by a dummy,
or cleaned under Clean Descriptors). The limit: a number or a 16-character code string could
in principle encode a date or a surname; no known attribute does, and a vendor that misuses one
is not caught. Two more exceptions keep outputs linkable and valid: a UI value is replaced by its keyed UID (not removed) unless it is a UID of the
standard itself, and a sequence is kept with its items judged element by element. Private
attributes are removed unless safe-listed; repeating groups ``50xx`` (curves) and ``60xx``
(overlays) are removed whole under every option (an overlay bitmap can carry burned-in text that
no option can clean); group lengths and command-group elements are dropped (lengths change). When
options disagree on one attribute, retaining (K) wins over cleaning (C), which wins over the basic
action, as each option is a site's explicit choice.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from fedeid import __version__
from fedeid.dicom.pseudonyms import Keyring, shift_da, shift_dt
from fedeid.dicom.scrub import Identifiers, Scrubber, collect, values_of as _values

TABLE_FILE = "annex_e.csv"
SAFE_FILE = "safe_attributes.csv"

# Option columns of annex_e.csv, in the order of Table E.1-1.
OPTION_COLUMNS = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)

# CID 7050 codes for DeidentificationMethodCodeSequence (PS3.16).
CODE_MEANINGS = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113103": "Clean Graphics Option",
    "113104": "Clean Structured Content Option",
    "113105": "Clean Descriptors Option",
    "113106": "Retain Longitudinal Temporal Information Full Dates Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
    "113109": "Retain Device Identity Option",
    "113110": "Retain UIDs Option",
    "113111": "Retain Safe Private Option",
    "113112": "Retain Institution Identity Option",
}

# UIDs in these attributes name classes, syntaxes and coding schemes, not instances: never mapped.
CLASS_UID_TAGS = frozenset(
    {
        0x00020002,  # Media Storage SOP Class UID
        0x00020010,  # Transfer Syntax UID
        0x00020012,  # Implementation Class UID
        0x00041510,  # Referenced SOP Class UID in File
        0x00041512,  # Referenced Transfer Syntax UID in File
        0x00080016,  # SOP Class UID
        0x0008001A,  # Related General SOP Class UID
        0x0008001B,  # Original Specialized SOP Class UID
        0x00080062,  # SOP Classes in Study
        0x0008010C,  # Coding Scheme UID
        0x00080118,  # Mapping Resource UID
        0x00081150,  # Referenced SOP Class UID
        0x0040DB0C,  # Template Extension Organization UID
        0x0040DB0D,  # Template Extension Creator UID
    }
)

# X/Z sequences that are Type 2 wherever their module is used (Acquisition Context Module,
# PS3.3 C.7.6.14): emptied, not removed. The only other X/Z sequence, Referenced Study Sequence,
# is Type 3 (General Study Module) and is removed.
TYPE2_XZ_SEQUENCES = frozenset({0x00400555})

# Type 1/2 text attributes outside the table that their IOD cannot lose: replaced by a dummy (or
# cleaned under Clean Descriptors) instead of removed, so the output stays valid.
REQUIRED_TEXT_TAGS = frozenset(
    {
        0x00620005,  # Segment Label (Segmentation)
        0x00620009,  # Segment Algorithm Name (Segmentation)
        0x00700081,  # Content Description (Content Identification)
        0x00409210,  # LUT Label (Real World Value Mapping)
        0x00283003,  # LUT Explanation (Real World Value Mapping, Modality/VOI LUT)
    }
)
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UT", "UC", "PN"})
# Value length limits of the text VRs (PS3.5 6.2), so cleaned text stays a valid value.
_MAX_CHARS = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "PN": 64}
# VRs that carry no free text (numbers, tags, code strings of defined terms): a dictionary
# attribute of one of these, written with its dictionary VR, is kept without a safe-list entry.
_CODED_VRS = frozenset({"CS", "AT", "DS", "IS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "OF", "OD", "OL", "OV"})
_DUMMY_TEXT = "DEIDENTIFIED"
_DUMMY: dict[str, Any] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000D",
    "IS": "0",
    "DS": "0",
    "UR": "urn:deidentified",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
    "AT": None,
}
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_TAG_RE = re.compile(r"^\(([0-9A-FX]{4}),([0-9A-FX]{4})\)$")


@dataclass(frozen=True)
class Rule:
    """One row of Table E.1-1: the basic action and what each option changes it to."""

    tag: str
    name: str
    basic: str
    options: dict[str, str]
    source: str


@dataclass(frozen=True)
class ProfileOptions:
    """The standard options a site chooses (PS3.15 E.3); all off is the bare Basic Profile."""

    retain_long_full_dates: bool = False
    retain_long_modified_dates: bool = False
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_uids: bool = False
    clean_descriptors: bool = False
    clean_structured_content: bool = False
    clean_graphics: bool = False
    # Retain Safe Private: (private creator, group, element low byte) kept; empty removes all.
    safe_private: frozenset[tuple[str, int, int]] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.retain_long_full_dates and self.retain_long_modified_dates:
            raise ValueError("choose full dates or modified dates for longitudinal temporal information, not both")

    @property
    def enabled(self) -> tuple[str, ...]:
        """Option columns of the table in force (Retain Safe Private when a safe list is given)."""
        on = [name for name in OPTION_COLUMNS if getattr(self, name, False)]
        if self.safe_private:
            on.insert(0, "retain_safe_private")
        return tuple(on)

    def method_codes(self) -> list[str]:
        """CID 7050 code values for the profile and each option in force."""
        by_option = {
            "retain_safe_private": "113111",
            "retain_uids": "113110",
            "retain_device_identity": "113109",
            "retain_institution_identity": "113112",
            "retain_patient_characteristics": "113108",
            "retain_long_full_dates": "113106",
            "retain_long_modified_dates": "113107",
            "clean_descriptors": "113105",
            "clean_structured_content": "113104",
            "clean_graphics": "113103",
        }
        return ["113100"] + [by_option[o] for o in self.enabled]

    def to_dict(self) -> dict[str, Any]:
        """For the manifest: option names only, the safe list as its size (creators can be sites)."""
        d: dict[str, Any] = {name: bool(getattr(self, name, False)) for name in OPTION_COLUMNS if hasattr(self, name)}
        d["safe_private_entries"] = len(self.safe_private)
        return d


@lru_cache(maxsize=1)
def load_table() -> tuple[Rule, ...]:
    """Read ``annex_e.csv`` (shipped as package data); ``#`` lines are provenance notes."""
    text = resources.files("fedeid.dicom").joinpath(TABLE_FILE).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    rules = []
    for row in csv.DictReader(lines):
        rules.append(
            Rule(
                tag=row["tag"],
                name=row["name"],
                basic=row["basic"],
                options={c: row[c] for c in OPTION_COLUMNS if row[c]},
                source=row["options_source"],
            )
        )
    return tuple(rules)


def resolve(rule: Rule, options: ProfileOptions) -> str:
    """The one concrete action for a row: ``X Z D U K C``, ``XZ`` (X/Z: a sequence is removed, any
    other attribute emptied) or ``KS`` (keep a sequence and clean its items)."""
    chosen = [rule.options[o] for o in options.enabled if o in rule.options]
    action = "K" if "K" in chosen else "C" if "C" in chosen else chosen[0] if chosen else rule.basic
    if action == "X/Z/U*":
        return "KS"
    if "D" in action.split("/"):
        return "D"
    if action == "X/Z":
        return "XZ"
    return action


def _tag_int(text: str) -> int | None:
    m = _TAG_RE.match(text)
    if not m or "X" in text:
        return None
    return int(m.group(1) + m.group(2), 16)


@lru_cache(maxsize=8)
def action_map(options: ProfileOptions) -> dict[int, str]:
    """Tag → concrete action for every non-repeating row of the table, under ``options``."""
    out: dict[int, str] = {}
    for rule in load_table():
        tag = _tag_int(rule.tag)
        if tag is not None:
            out[tag] = resolve(rule, options)
    return out


@lru_cache(maxsize=4096)
def _dict_vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


@lru_cache(maxsize=4096)
def _vr_fits(tag: int, vr: str) -> bool:
    """Whether ``vr`` is one the dictionary allows for ``tag``: a safe-listed tag written with
    another VR (a mislabelled or crafted element) is not what the safe list vouches for."""
    try:
        return vr in dictionary_VR(tag).split(" or ")
    except KeyError:
        return False


@lru_cache(maxsize=1)
def safe_tags() -> frozenset[int]:
    """Tags of ``safe_attributes.csv``; a keyword the dictionary does not know is an error in the data."""
    text = resources.files("fedeid.dicom").joinpath(SAFE_FILE).read_text(encoding="utf-8")
    tags = set()
    for line in text.splitlines():
        keyword = line.split("#", 1)[0].strip()
        if keyword:
            tag = tag_for_keyword(keyword)
            if tag is None:
                raise ValueError(f"{SAFE_FILE}: {keyword!r} is not a DICOM keyword")
            tags.add(tag)
    return frozenset(tags)


def patient_key(ds: Dataset) -> str:
    """What makes one patient one patient across files: the basis of pseudonym and date shift.

    The Patient ID alone, without its issuer: a site exports the same patient sometimes with
    IssuerOfPatientID and sometimes without, and two keys would give one patient two pseudonyms
    and two date shifts (intervals between their studies would no longer hold). The limit: two
    patients of two issuers who share an ID text share a pseudonym; a site merging several
    issuers' ID spaces should make IDs unique first. Without an ID: name and birth date; without
    those, the study (each study then its own patient).
    """
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return f"id:{pid}"
    name = str(ds.get("PatientName", "") or "").strip()
    if name:
        return f"name:{name}|{str(ds.get('PatientBirthDate', '') or '').strip()}"
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    return f"study:{study}" if study else ""


class HeaderProfile:
    """Applies the profile under fixed options and keys to one dataset after another."""

    def __init__(self, options: ProfileOptions, keyring: Keyring) -> None:
        self.options = options
        self.keys = keyring
        self._actions = action_map(options)
        self._shift_dates = options.retain_long_modified_dates
        self._safe = safe_tags()
        self._cleans_text = options.clean_descriptors or options.clean_structured_content or options.clean_graphics

    # -- public -----------------------------------------------------------------------------
    def apply(self, ds: Dataset, extra_codes: Iterable[str] = (), method_notes: Iterable[str] = ()) -> str:
        """De-identify ``ds`` in place and record how (PS3.15 E.1.1 attributes); returns the
        patient's pseudonym (empty when the file names no patient, study or ID)."""
        pkey = patient_key(ds)
        ctx = _Context(
            pseudonym=self.keys.pseudonym(pkey) if pkey else "",
            shift=self.keys.date_shift(pkey or "no-patient"),
            # Collected before the walk changes anything, and only when an option keeps text.
            found=collect(ds) if self._cleans_text else Identifiers(),
        )
        self._clean(ds, ctx)
        self._mark(ds, extra_codes, method_notes)
        return ctx.pseudonym

    # -- walking ----------------------------------------------------------------------------
    def _clean(self, ds: Dataset, ctx: _Context) -> None:
        private_keep: set[int] = set()
        for tag in list(ds.keys()):
            group, elem = tag >> 16, tag & 0xFFFF
            if group & 1:
                if 0x10 <= elem <= 0xFF:
                    continue  # a private creator: decided below, once its block is known
                if self._keep_private(ds, tag, group, elem):
                    private_keep.add(tag)
                    private_keep.add((group << 16) | (elem >> 8))
                    item = ds[tag]
                    if item.VR == "SQ":
                        for sub in item.value:
                            self._clean(sub, ctx)
                else:
                    del ds[tag]
                continue
            if group == 0 or elem == 0 or (0x5000 <= group <= 0x50FF) or (0x6000 <= group <= 0x60FF):
                del ds[tag]
                continue
            action = self._actions.get(tag)
            if action is None:
                self._unlisted(ds, tag, ctx)
            else:
                self._act(ds, tag, action, ctx)
        # A private creator stays only if an element of its block stayed.
        for tag in list(ds.keys()):
            if tag >> 16 & 1 and 0x10 <= (tag & 0xFFFF) <= 0xFF and tag not in private_keep:
                del ds[tag]

    def _keep_private(self, ds: Dataset, tag: int, group: int, elem: int) -> bool:
        if not self.options.safe_private or elem < 0x1000:
            return False
        creator_tag = (group << 16) | (elem >> 8)
        if creator_tag not in ds:
            return False
        creator = str(ds[creator_tag].value or "").strip().upper()
        return (creator, group, elem & 0xFF) in self.options.safe_private

    def _vr(self, ds: Dataset, tag: int) -> str:
        # The raw VR when the file states one; implicit VR (None) and UN fall back to the data
        # dictionary, as pydicom itself does when it converts the element.
        vr = getattr(ds.get_item(tag), "VR", None)
        if vr and vr != "UN":
            return str(vr)
        known = _dict_vr(tag)
        return known if known != "UN" else str(vr or "UN")

    def _unlisted(self, ds: Dataset, tag: int, ctx: _Context) -> None:
        """An attribute without a row: safe-listed ones stay; inside a D/C container, text takes
        the container's action; everywhere else only UIDs (mapped) and sequences (walked) stay."""
        vr = self._vr(ds, tag)
        if vr == "SQ":
            if _dict_vr(tag) == "UN":  # a sequence no dictionary knows: nothing vouches for it
                del ds[tag]
            else:
                for item in ds[tag].value:
                    self._clean(item, ctx)
        elif tag in self._safe and _vr_fits(tag, vr):
            return
        elif vr == "UI":
            if self.options.retain_uids:
                return
            elem = ds[tag]
            mapped = [v if str(v) in UID_dictionary else self.keys.uid(str(v)) for v in _values(elem.value) if str(v)]
            _set(elem, mapped)
        elif vr in _CODED_VRS and _vr_fits(tag, vr):
            return  # a number or defined term of the dictionary (an RT ROI number, a region flag)
        elif ctx.container and _dict_vr(tag) != "UN" and vr in _TEXT_VRS | {"DA", "DT", "TM", "UR"}:
            self._act(ds, tag, ctx.container, ctx)
        elif tag in REQUIRED_TEXT_TAGS:
            self._act(ds, tag, "C" if self.options.clean_descriptors else "D", ctx)
        else:
            del ds[tag]

    def _act(self, ds: Dataset, tag: int, action: str, ctx: _Context) -> None:
        if action == "X":
            del ds[tag]
            return
        vr = self._vr(ds, tag)
        if vr == "SQ":
            if action == "XZ" and tag not in TYPE2_XZ_SEQUENCES:
                # X or Z: removing a Type 3 sequence is valid where an empty one is an error.
                del ds[tag]
            elif action == "XZ":
                ds[tag].value = Sequence()
            elif action == "Z":
                ds[tag].value = Sequence()
            else:  # K, KS, C, D, U on a sequence: keep it, clean what is inside
                # D and C pass on to the items' unlisted text (K keeps; KS only maps UIDs).
                outer = ctx.container
                ctx.container = action if action in ("D", "C") else outer
                try:
                    for item in ds[tag].value:
                        self._clean(item, ctx)
                finally:
                    ctx.container = outer
            return
        if action == "K":  # an option the site chose keeps this attribute, UIDs included
            return
        if action == "D" and ctx.container == "C" and vr in _TEXT_VRS and vr != "PN":
            action = "C"  # a clean option on the container: its text is cleaned, not replaced
        elem = ds[tag]
        if tag == 0x00100020 and action in ("D", "Z"):  # Patient ID: the keyed pseudonym
            _set(elem, [ctx.pseudonym] if ctx.pseudonym else [])
        elif tag == 0x00100010 and action in ("D", "Z"):  # Patient's Name: same pseudonym
            _set(elem, [ctx.pseudonym] if ctx.pseudonym else [])
        elif action in ("Z", "XZ"):
            elem.value = None
        elif vr == "UI" and action in ("U", "D"):
            _set(elem, [self.keys.uid(str(v)) for v in _values(elem.value) if str(v)])
        elif action == "D":
            _set(elem, [_dummy(vr)])
        elif action == "C":
            self._clean_value(elem, vr, ctx)
        else:  # "U" on a non-UI attribute cannot map a UID: replace like D
            _set(elem, [_dummy(vr)])

    def _clean_value(self, elem: DataElement, vr: str, ctx: _Context) -> None:
        if vr in ("DA", "DT", "TM"):
            if not self._shift_dates:
                # C on a date without Modified Dates comes from another option (rare): remove the value.
                elem.value = None
            elif vr == "DA":
                _set(elem, [shift_da(str(v), ctx.shift) for v in _values(elem.value)])
            elif vr == "DT":
                _set(elem, [shift_dt(str(v), ctx.shift) for v in _values(elem.value)])
            return
        if vr == "PN":  # a person's name is never text to clean: it is replaced
            _set(elem, [_dummy(vr)])
        elif vr in _TEXT_VRS and elem.value is not None:
            limit = _MAX_CHARS.get(vr)
            _set(elem, [ctx.scrub(str(v))[:limit] for v in _values(elem.value)])

    # -- marking ----------------------------------------------------------------------------
    def _mark(self, ds: Dataset, extra_codes: Iterable[str], method_notes: Iterable[str]) -> None:
        ds.PatientIdentityRemoved = "YES"
        codes = self.options.method_codes() + [c for c in extra_codes if c not in self.options.method_codes()]
        # The text names the profile, then every option in force (as the code sequence does).
        notes = [f"PS3.15 E.1 Basic Profile, fedeid {__version__}"]
        notes += [CODE_MEANINGS[c][:64] for c in codes[1:]] + [n[:64] for n in method_notes]
        ds.DeidentificationMethod = notes if len(notes) > 1 else notes[0]
        items = []
        for value in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = CODE_MEANINGS[value]
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        if self.options.retain_long_full_dates:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif self.options.retain_long_modified_dates:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"


@dataclass
class _Context:
    """One dataset's walk: its patient's keys, the enclosing container's action, its cleaner."""

    pseudonym: str
    shift: Any
    found: Identifiers
    container: str = ""
    _scrubber: Scrubber | None = None

    def scrub(self, text: str) -> str:
        # Compiled on first use: under most options most files clean no text at all.
        if self._scrubber is None:
            self._scrubber = Scrubber(self.found)
        return self._scrubber(text)


def _dummy(vr: str) -> Any:
    if vr in _BINARY_VRS:
        return b"\x00\x00"
    return _DUMMY.get(vr, _DUMMY_TEXT)


def _set(elem: DataElement, values: list[Any]) -> None:
    if not values:
        elem.value = None
    elif len(values) == 1:
        elem.value = values[0]
    else:
        elem.value = values
