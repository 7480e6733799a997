"""The DICOM batch over every file pydicom and pydicom-data ship, checked by independent tools.

Identifier check ("no identifier bytes in any output"): from every input we collect Patient's
Name, Patient ID, Birth Date, Accession Number, Institution Name/Address, Referring/Performing
Physician's Name, Operators' Name, and every UID value anywhere in the dataset (sequences and file
meta included) except UIDs of the standard itself (SOP classes, transfer syntaxes: pydicom's UID
dictionary, and attributes that only ever hold class UIDs). None may occur in any output file's
bytes or in the manifest. Skipped as meaningless to search for: values shorter than 4 characters,
values with no letter or digit ("^^^^", "----"), and values that are a vendor's name elsewhere in the
corpus (two files record "TOSHIBA"/"OFFIS" as institution; the profile keeps Manufacturer, as the
standard does). Purely numeric values shorter than 6 digits are skipped. Values made of digits and
dots only (IDs, dates, UIDs) are searched outside binary values (Pixel Data, palette LUTs, ...):
binary data spells such runs by chance (0x31 x 8 is "11111111"; a synthesised 16-bit gradient
read "9.8.7.6"), and ASCII in pixel data is never readable text anyway.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import pydicom
from pydicom.data.data_manager import DATA_ROOT, external_data_sources, get_url_map
from pydicom.uid import UID_dictionary

from fedeid.dicom import commands
from fedeid.dicom.pipeline import MANIFEST_NAME, STATUSES, DicomDeidentifier, read_manifest
from fedeid.dicom.profile import CLASS_UID_TAGS, ProfileOptions
from fedeid.dicom.pseudonyms import Keyring

SECRET = bytes(range(32))
IN_CI = os.environ.get("CI", "").lower() == "true"
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
)


def _local_corpus() -> tuple[list[Path], list[str]]:
    """Every test file available offline, and the names pydicom would have to download."""
    roots = [Path(DATA_ROOT) / "test_files"] + [Path(s.data_path) for s in external_data_sources().values()]
    files = [p for root in roots for p in root.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    present = {p.name for p in files}
    return files, sorted(n for n in get_url_map() if n not in present)


CORPUS, NEEDS_DOWNLOAD = _local_corpus()


@pytest.mark.parametrize("name", NEEDS_DOWNLOAD or ["(none)"])
def test_files_that_need_a_download_are_skipped_explicitly(name: str) -> None:
    if name == "(none)":
        return
    pytest.skip(f"{name}: pydicom would download it (not in pydicom or pydicom-data 1.0); tests run offline")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("dicom") / "in"
    for src in CORPUS:
        base = Path(DATA_ROOT) / "test_files"
        rel = Path("pydicom") / src.relative_to(base) if base in src.parents else Path("pydicom-data") / src.name
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / rel)
    return root, {str(p.relative_to(root)): _sha(p) for p in root.rglob("*") if p.is_file()}


def _runner(model=None, level=None) -> DicomDeidentifier:
    return DicomDeidentifier(ProfileOptions(), Keyring(SECRET), model=model, level=level)


def _test_model():
    from fedeid.config import preset
    from fedeid.deid.pipeline import DeIdentifier

    model = DeIdentifier.build(preset("test"), device="cpu")
    # The untrained 64 px model stands in for every greyscale modality the corpus has, so that
    # every decoder and bit depth goes through the pixel path.
    model.modalities = ("CR", "DX", "CT", "MR", "NM", "OT", "US", "MG", "PT", "XA")
    return model


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, tuple[DicomDeidentifier, object, Path]]:
    import torch

    root, _ = corpus
    out = {}
    threads = torch.get_num_threads()
    # One intra-op thread: on a 2-core machine shared with other jobs, two threads made each
    # 64 px forward pass ~15x slower (oversubscription), and one image at a time gains nothing.
    torch.set_num_threads(1)
    try:
        for mode, runner in (("header", _runner()), ("pixel", _runner(_test_model(), 0.5))):
            dest = tmp_path_factory.mktemp(mode) / "out"
            out[mode] = (runner, runner.run(root, dest, progress=False), dest)
    finally:
        torch.set_num_threads(threads)
    return out


def _source_map(summary, root: Path) -> dict[str, Path]:
    """Output relative path → input file (the records keep the input path in memory only)."""
    return {r.output: root / r.path for r in summary.records if r.output}


@pytest.mark.parametrize("mode", ["header", "pixel"])
def test_every_file_is_deidentified_or_has_a_clear_reason(runs, corpus, mode: str) -> None:
    root, hashes = corpus
    runner, summary, out = runs[mode]
    assert len(summary.records) == len(hashes)
    for record in summary.records:
        assert record.status in STATUSES
        if record.status == "deidentified":
            assert (out / record.output).is_file()
        else:
            assert len(record.reason) > 15, record
    counts = summary.counts
    if mode == "header":
        assert counts["deidentified"] >= 200 and counts["refused"] <= 5
    else:
        assert counts["deidentified"] >= 70 and counts["refused"] >= 40  # colour, RT, SR, SEG ...
    reasons = " ".join(r.reason for r in summary.records)
    assert "DICOMDIR" in reasons and "not a DICOM file" in reasons and "truncated" in reasons
    if mode == "pixel":
        assert "colour image" in reasons and "is not one the model was trained for" in reasons
    manifest = read_manifest(out / MANIFEST_NAME)
    assert manifest["counts"] == counts and manifest["complete"]
    assert manifest["runs"][0]["mode"] == ("header-only" if mode == "header" else "pixel")
    assert manifest["runs"][0]["level"] == (None if mode == "header" else 0.5)


@pytest.mark.parametrize("mode", ["header", "pixel"])
def test_outputs_reread_and_say_how_they_were_deidentified(runs, mode: str) -> None:
    _, summary, out = runs[mode]
    for record in summary.records:
        if record.status != "deidentified":
            continue
        ds = pydicom.dcmread(out / record.output)
        assert ds.PatientIdentityRemoved == "YES"
        codes = [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]
        assert codes[0] == "113100"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert str(ds.SOPInstanceUID).startswith("2.25.")
        if mode == "pixel" and "PixelData" in ds:
            assert not ds.file_meta.TransferSyntaxUID.is_compressed and ds.file_meta.TransferSyntaxUID.is_little_endian
            assert ds.pixel_array.shape[-2:] == (ds.Rows, ds.Columns)
            assert "fedeid pixel de-identification, level 0.5" in list(ds.DeidentificationMethod)


def _values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _corpus_identifiers(root: Path) -> dict[bytes, str]:
    found: dict[bytes, str] = {}
    vendors: set[str] = set()

    def walk(ds) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR == "UI" and elem.tag not in CLASS_UID_TAGS:
                for v in _values(elem.value):
                    v = v.strip().rstrip("\x00")
                    if len(v) >= 4 and v not in UID_dictionary:
                        found.setdefault(v.encode(), f"UID {elem.keyword}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in root.rglob("*"):
            try:
                ds = pydicom.dcmread(p, force=True)
                vendors.update(v.strip() for v in _values(ds.get("Manufacturer")))
                for keyword in IDENTIFYING:
                    for v in _values(ds.get(keyword)):
                        v = v.strip()
                        if len(v) >= 4 and re.search(r"[A-Za-z0-9]", v):
                            found.setdefault(v.encode(errors="replace"), keyword)
                walk(ds)
                walk(getattr(ds, "file_meta", []))
            except Exception:  # unreadable inputs contribute what was read before the fault
                continue
    vendors_lower = [v.lower() for v in vendors if v]
    found = {v: k for v, k in found.items() if not any(v.decode(errors="replace").lower() in w for w in vendors_lower)}
    return {
        v: k for v, k in found.items() if not (v.replace(b" ", b"").isdigit() and len(v) < 6)
    }


def _numeric_like(value: bytes) -> bool:
    return value.replace(b" ", b"").replace(b".", b"").isdigit()


def _binary_values(ds) -> list[bytes]:
    """Values of binary VRs (pixels, LUTs, ...), where digit runs occur by chance."""
    blobs = []
    for elem in ds.iterall():
        if elem.VR in ("OB", "OW", "OD", "OF", "OL", "OV", "UN") and isinstance(elem.value, bytes) and len(elem.value) >= 8:
            blobs.append(elem.value)
    return blobs


@pytest.mark.parametrize("mode", ["header", "pixel"])
def test_no_identifier_of_any_input_occurs_in_any_output_bytes(runs, corpus, mode: str) -> None:
    root, _ = corpus
    identifiers = _corpus_identifiers(root)
    assert len(identifiers) > 300
    _, _, out = runs[mode]
    leaks = []
    for path in out.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        text_only = data
        if path.name != MANIFEST_NAME:
            for blob in _binary_values(pydicom.dcmread(path)):
                text_only = text_only.replace(blob, b"")
        for value, kind in identifiers.items():
            hay = text_only if _numeric_like(value) else data
            if value in hay:
                leaks.append(f"{path.relative_to(out)}: {kind} {value[:40]!r}")
    assert not leaks, leaks[:20]


def test_inputs_are_byte_identical_after_the_runs(runs, corpus) -> None:
    root, hashes = corpus
    assert {str(p.relative_to(root)): _sha(p) for p in root.rglob("*") if p.is_file()} == hashes


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is missing: .ci/run installs dicom3tools and dcmtk before the tests")
        pytest.skip(f"{name} not installed (apt-get install dicom3tools dcmtk)")
    return path


@pytest.mark.parametrize("mode", ["header", "pixel"])
def test_dcmdump_parses_every_output(runs, mode: str) -> None:
    dcmdump = _tool("dcmdump")
    _, summary, out = runs[mode]
    failures = []
    for record in summary.records:
        if record.status == "deidentified":
            r = subprocess.run([dcmdump, "-q", str(out / record.output)], capture_output=True, text=True, errors="replace")
            if r.returncode != 0 or "E:" in r.stderr:
                failures.append(f"{record.output}: {r.stderr.strip()[:200]}")
    assert not failures, failures


def _errors(dciodvfy: str, path: Path) -> set[str]:
    r = subprocess.run([dciodvfy, "-new", str(path)], capture_output=True, text=True, errors="replace")
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]
    norm = set()
    for line in lines:
        line = re.sub(r"<[^>]*>", "<v>", line.replace("</", "").replace("/>", ""))
        norm.add(re.sub(r"'[^']*'|\d+", "#", line))
    return norm


def _reencoded(src: Path, dest: Path) -> Path:
    """The input as pydicom writes it uncompressed: what dciodvfy checks when it cannot read the
    original (deflate) or when pixel mode decompressed it."""
    ds = pydicom.dcmread(src, force=True)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    pydicom.dcmwrite(dest, ds, enforce_file_format=True)
    return dest


@pytest.mark.parametrize("mode", ["header", "pixel"])
def test_dciodvfy_reports_no_error_the_input_did_not_have(runs, corpus, mode: str, tmp_path) -> None:
    dciodvfy = _tool("dciodvfy")
    root, _ = corpus
    runner, summary, out = runs[mode]
    sources = _source_map(summary, root)
    new_errors = []
    checked = 0
    for record in summary.records:
        if record.status != "deidentified":
            continue
        src = sources[record.output]
        after = _errors(dciodvfy, out / record.output)
        added = after - _errors(dciodvfy, src)
        if added:
            added -= _errors(dciodvfy, _reencoded(src, tmp_path / "baseline.dcm"))
        checked += 1
        if added:
            new_errors.append(f"{record.output}: {sorted(added)[:3]}")
    assert checked >= 70
    assert not new_errors, new_errors


def test_level_zero_keeps_every_stored_value(corpus, tmp_path) -> None:
    root, _ = corpus
    subset = tmp_path / "in"
    for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm", "JPEG-LL.dcm", "emri_small.dcm"):
        src = next(p for p in root.rglob(name))
        shutil.copyfile(src, subset / name) if subset.exists() else (subset.mkdir(), shutil.copyfile(src, subset / name))
    summary = _runner(_test_model(), 0.0).run(subset, tmp_path / "out", progress=False)
    assert summary.counts["deidentified"] == 5, [r.reason for r in summary.records]
    for record in summary.records:
        before = pydicom.dcmread(subset / record.path).pixel_array
        after = pydicom.dcmread(tmp_path / "out" / record.output).pixel_array
        np.testing.assert_array_equal(after, before)
        assert record.blocked_fraction == 0.0


def test_malformed_inputs_fail_with_a_reason_and_the_batch_goes_on(tmp_path) -> None:
    good = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(good, src / "good.dcm")
    data = good.read_bytes()
    (src / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (src / "garbage.dcm").write_bytes(os.urandom(4096))
    (src / "garbage_preamble").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(512))
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(src / "no_pixels.dcm")
    ds = pydicom.dcmread(good)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    ds.save_as(src / "unknown_syntax.dcm")
    ds = pydicom.dcmread(good)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(src / "burned_in.dcm")
    ds = pydicom.dcmread(good)
    ds.PixelData = b""  # present, zero length: reads back as None
    ds.save_as(src / "empty_pixels.dcm")
    ds = pydicom.dcmread(good)
    del ds.BitsAllocated  # Type 1: without it no one can tell whether the pixels are whole
    ds.save_as(src / "no_bits_allocated.dcm")
    model = _test_model()
    for runner in (_runner(), _runner(model, 0.5)):
        summary = runner.run(src, tmp_path / f"out-{runner.mode}", progress=False)
        by = {r.path: r for r in summary.records}
        assert by["good.dcm"].status == "deidentified"
        assert by["truncated.dcm"].status == "failed" and "truncated" in by["truncated.dcm"].reason
        assert by["garbage.dcm"].status == "failed" and "not a DICOM file" in by["garbage.dcm"].reason
        assert by["garbage_preamble"].status == "failed"
        assert by["burned_in.dcm"].status == "refused" and "Burned In Annotation" in by["burned_in.dcm"].reason
        assert by["empty_pixels.dcm"].status == "failed", by["empty_pixels.dcm"]
        assert "Pixel Data" in by["empty_pixels.dcm"].reason
        nba = by["no_bits_allocated.dcm"]  # header-only: failed as malformed; pixel mode: refused first
        assert nba.status in ("failed", "refused") and re.search("Bits ?Allocated", nba.reason), nba
        if runner.mode == "pixel":
            assert by["no_pixels.dcm"].status == "failed" and "missing Pixel Data" in by["no_pixels.dcm"].reason
            assert by["unknown_syntax.dcm"].status == "failed"
            assert "pixel data" in by["unknown_syntax.dcm"].reason
        for record in summary.records:
            assert record.status == "deidentified" or record.reason


def test_cli_runs_reruns_consistently_and_guards_its_input(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())

    def cli(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    src = tmp_path / "in" / "patient"
    src.mkdir(parents=True)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copyfile(pydicom.data.get_testdata_file(name), src / name)
    secret = tmp_path / "site.key"
    assert cli("dicom", "keygen", str(secret)) == 0
    with pytest.raises(Exception):
        cli("dicom", "keygen", str(secret))  # never overwrite the key every mapping depends on
    for run in ("a", "b"):
        assert cli("dicom", "deid", str(tmp_path / "in"), str(tmp_path / run), "--secret-file", str(secret),
                   "--retain-dates", "modified", "--no-progress") == 0
    assert "2 files: 2 de-identified, 0 refused, 0 failed" in capsys.readouterr().out
    key = Keyring(bytes.fromhex(secret.read_text())).token("patient/CT_small.dcm")
    manifest = read_manifest(tmp_path / "a" / MANIFEST_NAME)
    name = next(r["output"] for r in manifest["files"] if r["input"] == key)
    assert "CT_small" not in name and "patient" not in name and name.count("/") == 3
    a = pydicom.dcmread(tmp_path / "a" / name)
    b = pydicom.dcmread(tmp_path / "b" / name)
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.PatientID == b.PatientID
    assert a.StudyDate != pydicom.dcmread(src / "CT_small.dcm").StudyDate
    assert "113107" in [i.CodeValue for i in a.DeidentificationMethodCodeSequence]
    assert manifest["runs"][0]["options"]["retain_long_modified_dates"] is True
    assert manifest["runs"][0]["key_fingerprint"] == Keyring(bytes.fromhex(secret.read_text())).fingerprint
    with pytest.raises(ValueError):
        cli("dicom", "deid", str(tmp_path / "in"), str(src / "out"), "--secret-file", str(secret))
    with pytest.raises(ValueError):  # neither the manifest nor the path map may land in IN
        cli("dicom", "deid", str(tmp_path / "in"), str(tmp_path / "d"), "--secret-file", str(secret),
            "--manifest", str(src / "m.jsonl"))
    with pytest.raises(ValueError):
        cli("dicom", "deid", str(tmp_path / "in"), str(tmp_path / "d"), "--secret-file", str(secret),
            "--path-map", str(tmp_path / "d" / "map.jsonl"))
    with pytest.raises(ValueError):  # resuming needs the options of the run that wrote the journal
        cli("dicom", "deid", str(tmp_path / "in"), str(tmp_path / "a"), "--secret-file", str(secret), "--resume")
    with pytest.raises(ValueError):
        cli("dicom", "deid", str(tmp_path / "in"), str(tmp_path / "c"), "--secret-file", str(secret), "--level", "0.5")


def test_worker_processes_write_the_same_outputs_as_one_process(corpus, tmp_path) -> None:
    root, _ = corpus
    src = root / "pydicom" / "dicomdirtests"
    one = _runner().run(src, tmp_path / "one", progress=False, workers=1)
    two = _runner().run(src, tmp_path / "two", progress=False, workers=2)
    assert sorted((r.input, r.status) for r in one.records) == sorted((r.input, r.status) for r in two.records)
    for record in one.records:
        if record.status == "deidentified":
            assert (tmp_path / "one" / record.output).read_bytes() == (tmp_path / "two" / record.output).read_bytes()


def test_cli_pixel_mode_at_level_one_cleans_burned_in_pixels(tmp_path, capsys) -> None:
    from fedeid.config import preset
    from fedeid.deid.pipeline import DeIdentifier

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    ckpt = tmp_path / "model.pt"
    DeIdentifier.build(preset("test"), device="cpu").save(ckpt)  # trained for CR and DX
    src = tmp_path / "in"
    src.mkdir()
    cr = next(Path(p) for p in CORPUS if p.name == "6154")  # a MONOCHROME1 CR of the dicomdir tests
    ds = pydicom.dcmread(cr)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(src / "cr.dcm")
    shutil.copyfile(pydicom.data.get_testdata_file("MR_small.dcm"), src / "mr.dcm")
    secret = tmp_path / "key"
    secret.write_text(SECRET.hex())
    for level in ("0.5", "1"):
        args = parser.parse_args(["dicom", "deid", str(src), str(tmp_path / f"out{level}"), "--model", str(ckpt),
                                  "--level", level, "--secret-file", str(secret), "--device", "cpu", "--no-progress"])
        assert args.func(args) == 1  # MR is refused: some file not done
    keys = Keyring(SECRET)
    rows = {r["input"]: r for r in read_manifest(tmp_path / "out1" / MANIFEST_NAME)["files"]}
    mr, cr = rows[keys.token("mr.dcm")], rows[keys.token("cr.dcm")]
    assert mr["status"] == "refused" and "modality MR" in mr["reason"]
    assert cr["status"] == "deidentified" and cr["blocked_fraction"] == 1.0
    out = pydicom.dcmread(tmp_path / "out1" / cr["output"])
    assert "113101" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert out.BurnedInAnnotation == "NO" and out.PhotometricInterpretation == "MONOCHROME1"
    half = read_manifest(tmp_path / "out0.5" / MANIFEST_NAME)["files"]
    assert {r["input"]: r["status"] for r in half}[keys.token("cr.dcm")] == "refused"
