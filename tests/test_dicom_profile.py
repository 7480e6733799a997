"""The PS3.15 Annex E header profile: every row of the table, every option, the keyed mappings."""

from __future__ import annotations

import importlib
import re
from datetime import date

import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fedeid.dicom.profile import (
    OPTION_COLUMNS,
    TYPE2_XZ_SEQUENCES,
    HeaderProfile,
    ProfileOptions,
    action_map,
    load_table,
    resolve,
)
from fedeid.dicom.pseudonyms import MAX_SHIFT_DAYS, Keyring, shift_da, shift_dt

SECRET = b"k" * 32
ORIGINAL_UID = "1.2.826.0.1.999.1.2.3.4.5"


def _tag(text: str) -> int:
    return int(text[1:5] + text[6:10], 16)


def _vr(tag: int, name: str) -> str:
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:  # attributes newer than pydicom's dictionary: VR from the name
        if name.endswith("UID"):
            return "UI"
        if "Sequence" in name:
            return "SQ"
        if name.endswith("DateTime"):
            return "DT"
        if name.endswith("Date"):
            return "DA"
        if name.endswith("Time"):
            return "TM"
        return "LO"


def _sample(vr: str):
    return {
        "UI": ORIGINAL_UID,
        "DA": "20210304",
        "DT": "20210304101112",
        "TM": "101112",
        "PN": "Doe^Jane",
        "AS": "042Y",
        "IS": "7",
        "DS": "1.5",
        "CS": "ORIGINAL",
        "US": 7,
        "SS": 7,
        "UL": 7,
        "SL": 7,
        "FL": 1.5,
        "FD": 1.5,
        "AT": 0x00100010,
        "UR": "http://h.example/x",
        "OB": b"\x01\x02",
        "OW": b"\x01\x02",
        "UN": b"\x01\x02",
    }.get(vr, "Jane Doe at Example Hospital")


def _one(tag: int, vr: str) -> Dataset:
    ds = Dataset()
    ds.PatientID = "PID-000123"
    if vr == "SQ":
        item = Dataset()
        item.CodeValue = "T-1"
        ds.add_new(tag, "SQ", Sequence([item]))
    else:
        ds.add_new(tag, vr, _sample(vr))
    return ds


ROWS = [r for r in load_table() if "X" not in r.tag]


def test_table_is_the_full_e1_1_table() -> None:
    rows = load_table()
    assert len(rows) >= 650, "Table E.1-1 of the 2026 releases has about 655 rows"
    tags = [r.tag for r in rows]
    assert len(tags) == len(set(tags))
    for must in ("(0010,0010)", "(0010,0020)", "(0008,0050)", "(0020,000D)", "(0008,0080)", "(50XX,XXXX)"):
        assert must in tags
    for rule in rows:
        assert rule.basic in {"X", "Z", "D", "U", "K", "C", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}, rule
        assert set(rule.options) <= set(OPTION_COLUMNS)
        assert set(rule.options.values()) <= {"K", "C", "X"}


@pytest.mark.parametrize("rule", ROWS, ids=[r.tag for r in ROWS])
def test_every_attribute_of_the_table_gets_its_basic_action(rule) -> None:
    tag = _tag(rule.tag)
    vr = _vr(tag, rule.name)
    ds = _one(tag, vr)
    before = ds[tag].value
    HeaderProfile(ProfileOptions(), Keyring(SECRET)).apply(ds)
    action = resolve(rule, ProfileOptions())
    if tag in (0x00100010, 0x00100020):  # patient name and ID: the keyed pseudonym
        assert str(ds[tag].value).startswith("FEDEID-")
        return
    if action == "X" or tag >> 16 == 0 or (action == "XZ" and vr == "SQ" and tag not in TYPE2_XZ_SEQUENCES):  # command-group elements never belong in a stored file
        assert tag not in ds
        return
    assert tag in ds, f"{rule.name} should stay ({action})"
    after = ds[tag].value
    if vr == "SQ":
        assert (len(after) == 0) if action in ("Z", "XZ") else (len(after) == 1)
    elif action in ("Z", "XZ"):
        assert after in (None, "", b"")
    elif action in ("U", "D") and vr == "UI":
        assert str(after).startswith("2.25.") and after != before
    elif action == "D":
        assert after not in (None, "", b"") and after != before
    elif action == "K":
        assert after == before


@pytest.mark.parametrize("option", [o for o in OPTION_COLUMNS if o not in ("clean_structured_content", "clean_graphics", "retain_safe_private")])
def test_each_option_keeps_what_its_column_keeps(option) -> None:
    opts = ProfileOptions(**{option: True})
    profile = HeaderProfile(opts, Keyring(SECRET))
    if option in ("retain_long_modified_dates", "clean_descriptors"):
        cleaned = [r for r in ROWS if r.options.get(option) == "C"]
        assert len(cleaned) > 40
        for rule in cleaned:
            tag = _tag(rule.tag)
            vr = _vr(tag, rule.name)
            ds = _one(tag, vr)
            profile.apply(ds)
            if vr in ("DA", "DT") and option == "retain_long_modified_dates":
                assert ds[tag].value and ds[tag].value != _sample(vr), rule.name
            elif vr in ("LO", "LT", "ST", "UT", "SH") and option == "clean_descriptors":
                assert tag in ds, rule.name
        return
    kept = [r for r in ROWS if r.options.get(option) == "K"]
    assert kept
    for rule in kept:
        tag = _tag(rule.tag)
        vr = _vr(tag, rule.name)
        if tag in (0x00100010, 0x00100020) or tag >> 16 == 0:
            continue
        ds = _one(tag, vr)
        before = ds[tag].value
        profile.apply(ds)
        assert tag in ds and (vr == "SQ" or ds[tag].value == before), rule.name
    codes = [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]
    assert codes[0] == "113100" and len(codes) == 2


def test_resolution_prefers_retain_over_clean_over_basic() -> None:
    acquisition_date = next(r for r in ROWS if r.tag == "(0008,0022)")
    assert resolve(acquisition_date, ProfileOptions()) == "XZ"
    assert resolve(acquisition_date, ProfileOptions(retain_long_full_dates=True)) == "K"
    assert resolve(acquisition_date, ProfileOptions(retain_long_modified_dates=True)) == "C"
    with pytest.raises(ValueError):
        ProfileOptions(retain_long_full_dates=True, retain_long_modified_dates=True)
    assert action_map(ProfileOptions())[0x00080018] == "U"
    assert action_map(ProfileOptions(retain_uids=True))[0x00080018] == "K"


def test_basic_column_matches_dicom_anonymizer_transcription() -> None:
    """An independent transcription of the same standard release, where it is installed."""
    try:
        ref = importlib.import_module("dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c")
    except ImportError:
        pytest.skip("dicom-anonymizer >= 2.1 (bench extra, with the 2026c table) not installed")

    names = {"D": "D_TAGS", "Z": "Z_TAGS", "X": "X_TAGS", "U": "U_TAGS", "Z/D": "Z_D_TAGS", "X/Z": "X_Z_TAGS",
             "X/D": "X_D_TAGS", "X/Z/D": "X_Z_D_TAGS", "X/Z/U*": "X_Z_U_STAR_TAGS"}
    for rule in ROWS:
        assert (_tag(rule.tag) >> 16, _tag(rule.tag) & 0xFFFF) in getattr(ref, names[rule.basic]), rule


def _patient(pid: str = "PID-1", uid: str = ORIGINAL_UID) -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = pid
    ds.PatientBirthDate = "19700101"
    ds.StudyInstanceUID = uid
    ds.SeriesInstanceUID = uid + ".1"
    ds.StudyDate = "20210304"
    ds.AcquisitionDateTime = "20210304101112.5+0100"
    ds.StudyDescription = "Chest of Jane Doe, PID-1"
    ds.InstitutionName = "Example Hospital"
    ds.Manufacturer = "ACME"
    return ds


def test_uids_and_pseudonyms_are_keyed_consistent_and_secret_bound() -> None:
    a, b = _patient(), _patient()
    HeaderProfile(ProfileOptions(), Keyring(SECRET)).apply(a)
    HeaderProfile(ProfileOptions(), Keyring(SECRET)).apply(b)  # another run, same key
    assert a.StudyInstanceUID == b.StudyInstanceUID != ORIGINAL_UID
    assert a.PatientID == b.PatientID == str(a.PatientName)
    assert re.fullmatch(r"2\.25\.\d+", a.StudyInstanceUID) and len(a.StudyInstanceUID) <= 64
    c = _patient()
    HeaderProfile(ProfileOptions(), Keyring(b"z" * 32)).apply(c)
    assert c.StudyInstanceUID != a.StudyInstanceUID and c.PatientID != a.PatientID
    d = _patient(pid="PID-2")
    HeaderProfile(ProfileOptions(), Keyring(SECRET)).apply(d)
    assert d.PatientID != a.PatientID
    assert a.PatientIdentityRemoved == "YES"
    assert a.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert a.LongitudinalTemporalInformationModified == "REMOVED"
    assert not a.StudyDate and "PatientBirthDate" in a and not a.PatientBirthDate
    assert a.InstitutionName == "DEIDENTIFIED" and a.Manufacturer == "ACME"  # X/Z/D: D keeps Type 1 valid
    assert "StudyDescription" not in a


def test_modified_dates_shift_per_patient_and_keep_intervals() -> None:
    keys = Keyring(SECRET)
    opts = ProfileOptions(retain_long_modified_dates=True, clean_descriptors=True)
    a, b = _patient(), _patient()
    b.StudyDate = "20210314"
    HeaderProfile(opts, keys).apply(a)
    HeaderProfile(opts, keys).apply(b)
    da, db = (date(int(x[:4]), int(x[4:6]), int(x[6:])) for x in (a.StudyDate, b.StudyDate))
    assert (db - da).days == 10
    shift = (da - date(2021, 3, 4)).days
    assert -MAX_SHIFT_DAYS <= shift <= -1
    assert a.AcquisitionDateTime[8:] == "101112.5+0100" and a.AcquisitionDateTime[:8] == a.StudyDate
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"
    assert not a.PatientBirthDate  # birth date is not a longitudinal date: still removed
    assert "Jane" not in a.StudyDescription and "PID-1" not in a.StudyDescription and "Chest" in a.StudyDescription
    codes = [i.CodeValue for i in a.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113105"]


def test_shift_helpers_keep_precision_and_drop_garbage() -> None:
    from datetime import timedelta

    assert shift_da("20210301", timedelta(days=-1)) == "20210228"
    assert shift_da("2021-03-01", timedelta(days=-1)) == ""
    assert shift_dt("2021", timedelta(days=-1)) == "2020"
    assert shift_dt("202103", timedelta(days=-1)) == "202102"
    assert shift_dt("20210301120000", timedelta(days=-1)) == "20210228120000"


def test_private_overlays_curves_and_lengths_are_removed_unless_safe_listed() -> None:
    ds = _patient()
    ds.add_new(0x00190010, "LO", "ACME 1.1")
    ds.add_new(0x00191010, "LO", "Jane Doe")
    ds.add_new(0x00191011, "DS", "2.5")
    ds.add_new(0x00290010, "LO", "OTHER")
    ds.add_new(0x00291001, "LO", "secret")
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60003000, "OW", b"\x00" * 8)
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x00080000, "UL", 100)
    HeaderProfile(ProfileOptions(), Keyring(SECRET)).apply(ds)
    assert not [t for t in ds.keys() if (t >> 16) & 1 or 0x5000 <= t >> 16 <= 0x60FF or t & 0xFFFF == 0]

    ds = _patient()
    ds.add_new(0x00190010, "LO", "ACME 1.1")
    ds.add_new(0x00191010, "LO", "Jane Doe")
    ds.add_new(0x00191011, "DS", "2.5")
    ds.add_new(0x00290010, "LO", "OTHER")
    ds.add_new(0x00291001, "LO", "secret")
    opts = ProfileOptions(safe_private=frozenset({("ACME 1.1", 0x0019, 0x11)}))
    HeaderProfile(opts, Keyring(SECRET)).apply(ds)
    assert [t for t in ds.keys() if (t >> 16) & 1] == [0x00190010, 0x00191011]
    assert "113111" in [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]


def test_sequences_are_recursed_and_unlisted_uids_replaced() -> None:
    ds = _patient()
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = ORIGINAL_UID + ".9"
    ref.PatientName = "Doe^Jane"
    ds.ReferencedImageSequence = [ref]
    ds.add_new(0x00189516, "SQ", Sequence([Dataset()]))  # unlisted sequence, kept and walked
    ds.add_new(0x00209221, "UI", ORIGINAL_UID + ".7")  # Dimension Organization UID? any unlisted UI
    HeaderProfile(ProfileOptions(), Keyring(SECRET)).apply(ds)
    item = ds.ReferencedImageSequence[0]
    assert item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert item.ReferencedSOPInstanceUID.startswith("2.25.")
    assert str(item.PatientName).startswith("FEDEID-")
    assert str(ds[0x00209221].value).startswith("2.25.")
