"""Acceptance: no PHI anywhere in outputs, manifest or paths; any file survives; a batch resumes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pydicom
import pytest

from dicom_phi import IDENTIFIERS, SR_DATE, STUDY_DATE, make_phi_tree
from fedeid.dicom import pipeline
from fedeid.dicom.pipeline import MANIFEST_NAME, DicomDeidentifier, read_manifest
from fedeid.dicom.profile import ProfileOptions
from fedeid.dicom.pseudonyms import Keyring
from fedeid.dicom.scrub import fold

SECRET = b"leak-test-secret-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent
OPTION_SETS = {
    "basic": ProfileOptions(),
    "clean-modified": ProfileOptions(
        retain_long_modified_dates=True, clean_descriptors=True, clean_structured_content=True, clean_graphics=True
    ),
    "clean-full-retain": ProfileOptions(
        retain_long_full_dates=True,
        retain_patient_characteristics=True,
        retain_device_identity=True,
        retain_institution_identity=True,
        clean_descriptors=True,
        clean_structured_content=True,
        clean_graphics=True,
    ),
    "retain-uids": ProfileOptions(retain_uids=True, clean_descriptors=True),
}


def _forms(value: str) -> set[bytes]:
    """Every byte form an identifier could take in an output."""
    texts = {value, value.casefold(), value.upper(), fold(value)}
    out = set()
    for text in texts:
        for encoding in ("utf-8", "latin-1", "utf-16-le", "gb18030"):
            try:
                out.add(text.encode(encoding))
            except UnicodeEncodeError:
                continue
    return {b for b in out if len(b) >= 4}


@pytest.fixture(scope="module")
def phi(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("phi") / "in"
    return root, make_phi_tree(root)


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_no_identifier_in_any_output_byte_manifest_or_path(phi, tmp_path, name: str) -> None:
    root, uids = phi
    options = OPTION_SETS[name]
    summary = DicomDeidentifier(options, Keyring(SECRET)).run(root, tmp_path / "out", progress=False)
    assert summary.counts["deidentified"] == 3, [r.reason for r in summary.records]
    # Retain Full Dates keeps the study date and the SR's DATE item (equal to the birth date here).
    kept = {STUDY_DATE, SR_DATE} if options.retain_long_full_dates else set()
    if options.retain_uids:  # the instances' own UIDs stay, by that option; the issuer's OID must not
        kept |= set(uids) - {"1.2.3.999.888"}
    values = [v for v in (*IDENTIFIERS, *uids, STUDY_DATE) if v not in kept]
    forms = {form: v for v in values for form in _forms(v)}
    hits = []
    for path in (tmp_path / "out").rglob("*"):
        rel = path.relative_to(tmp_path / "out").as_posix()
        hits += [f"path {rel}: {v}" for form, v in forms.items() if form.decode("utf-8", "ignore") in rel]
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{rel}: {v} as {form!r}" for form, v in forms.items() if form in data]
    assert not hits, hits[:10]
    outs = {r.path: pydicom.dcmread(tmp_path / "out" / r.output) for r in summary.records}
    by_kind = {ds.Modality: ds for ds in outs.values()}
    cr, mr, sr = by_kind["CR"], by_kind["MR"], by_kind["SR"]
    assert cr.PatientID == mr.PatientID  # with and without issuer: one patient
    assert cr.PatientIdentityRemoved == "YES"
    codes = [i.CodeValue for i in cr.DeidentificationMethodCodeSequence]
    temporal = cr.LongitudinalTemporalInformationModified
    if name == "basic":
        assert temporal == "REMOVED" and codes == ["113100"]
        assert sr.ContentSequence[0].TextValue == "DEIDENTIFIED"
        assert 0x00420110 not in cr and 0x00440120 not in cr  # unknown public tags, one of VR PN
        assert "UniversalEntityID" not in cr.IssuerOfPatientIDQualifiersSequence[0]  # outside the table
        assert "CommentsOnTheScheduledProcedureStep" not in cr.ScheduledProcedureStepSequence[0]
    elif name == "retain-uids":
        assert "113110" in codes and cr.SOPInstanceUID in uids
    else:
        assert {"113103", "113104", "113105"} <= set(codes)
        # Cleaned text keeps what is not identifying, as whole tokens.
        assert "Johnny" in cr.ImageComments and "***" in cr.ImageComments
        assert "Finding" not in sr.ContentSequence[0].TextValue and "***" in sr.ContentSequence[0].TextValue
        assert cr.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue.strip("* ") == ""
    if name == "clean-modified":
        assert temporal == "MODIFIED"
        shift = lambda ds: pydicom.valuerep.DA(ds.StudyDate)  # noqa: E731
        assert (shift(mr) - shift(cr)).days == 3  # one date shift for one patient
    if name == "clean-full-retain":
        assert temporal == "UNMODIFIED"


def _mutations(seed_files: list[bytes], n: int, rng: random.Random) -> list[bytes]:
    out = []
    for i in range(n):
        data = bytearray(rng.choice(seed_files))
        kind = i % 6
        if kind == 0:
            data = data[: rng.randrange(1, len(data))]  # truncated
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):  # byte flips
                data[rng.randrange(128, len(data))] ^= 1 << rng.randrange(8)
        elif kind == 2:  # a huge length field somewhere in the dataset
            at = rng.randrange(132, len(data) - 4)
            data[at : at + 4] = (0xFFFFFFF0).to_bytes(4, "little")
        elif kind == 3:
            data = bytearray(rng.randbytes(rng.randint(0, 600)))  # garbage
        elif kind == 4:  # a slice removed from the middle
            a = rng.randrange(132, len(data))
            del data[a : a + rng.randint(1, 64)]
        else:  # bytes inserted
            a = rng.randrange(132, len(data))
            data[a:a] = rng.randbytes(rng.randint(1, 16))
        out.append(bytes(data))
    return out


def _deflate_bomb() -> bytes:
    """A valid Part 10 header announcing Deflated Explicit VR, then 64 MiB of zeros deflated."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    head = pydicom.filebase.DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = squeeze.compress(b"\0" * (64 << 20)) + squeeze.flush()
    return head.getvalue() + body


FUZZ_SCRIPT = """
import re, resource, sys
from pathlib import Path
from fedeid.dicom.pipeline import DicomDeidentifier
from fedeid.dicom.profile import ProfileOptions
from fedeid.dicom.pseudonyms import Keyring
runner = DicomDeidentifier(ProfileOptions(clean_descriptors=True), Keyring(b"f" * 32), max_bytes=8 << 20)
runner.run(sys.argv[1], sys.argv[2], progress=False)
# peak RSS of this process (VmHWM belongs to the address space exec made: RUSAGE_SELF's ru_maxrss
# keeps the forked test runner's peak across exec, so it measured pytest) and of its workers
own = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
"""


def test_fuzzed_files_fail_with_reasons_and_never_pass_corrupted(phi, tmp_path) -> None:
    root, _ = phi
    seeds = [p.read_bytes() for p in sorted(root.rglob("*.dcm"))]
    seeds += [Path(pydicom.data.get_testdata_file(n)).read_bytes() for n in ("CT_small.dcm", "SC_rgb_rle.dcm")]
    src = tmp_path / "in"
    src.mkdir()
    for i, data in enumerate(_mutations(seeds, 240, random.Random(1234))):
        (src / f"m{i:03d}.dcm").write_bytes(data)
    (src / "bomb.dcm").write_bytes(_deflate_bomb())
    (src / "link.dcm").symlink_to(src / "m000.dcm")
    os.mkfifo(src / "pipe.dcm")
    (src / "folder.dcm").mkdir()
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file() and not p.is_symlink()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", FUZZ_SCRIPT, str(src), str(tmp_path / "out")], capture_output=True,
                       text=True, errors="replace", env=env, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) < 400_000  # peak RSS in KiB: the 64 MiB bomb is never inflated whole
    manifest = read_manifest(tmp_path / "out" / MANIFEST_NAME)
    keys = Keyring(b"f" * 32)
    rows = {r["input"]: r for r in manifest["files"]}
    names = [*before, "link.dcm", "pipe.dcm", "folder.dcm"]
    assert {keys.token(n) for n in names} <= set(rows)
    for row in rows.values():
        assert row["status"] == "deidentified" or (len(row["reason"]) > 20 and "Traceback" not in row["reason"]), row
    assert rows[keys.token("bomb.dcm")]["status"] == "refused" and "cap" in rows[keys.token("bomb.dcm")]["reason"]
    for n in ("link.dcm", "pipe.dcm", "folder.dcm"):
        assert rows[keys.token(n)]["status"] == "skipped"
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file() and not p.is_symlink()} == before
    dcmdump = shutil.which("dcmdump")
    for row in rows.values():
        if row["status"] != "deidentified":
            continue
        ds = pydicom.dcmread(tmp_path / "out" / row["output"])
        native = not ds.file_meta.TransferSyntaxUID.is_encapsulated
        if native and "Rows" in ds and "PixelData" in ds:  # no corrupted image passes with pixels lost
            assert len(ds.PixelData) >= ds.Rows * ds.Columns * ds.BitsAllocated // 8
        if dcmdump:
            d = subprocess.run([dcmdump, "-q", str(tmp_path / "out" / row["output"])], capture_output=True, text=True, errors="replace")
            assert d.returncode == 0 and "E:" not in d.stderr, (row["output"], d.stderr[:300])


def test_a_killed_worker_is_reported_and_a_killed_batch_resumes(phi, tmp_path, monkeypatch) -> None:
    root, _ = phi
    src = tmp_path / "in"
    shutil.copytree(root, src)
    for i in range(6):
        shutil.copyfile(pydicom.data.get_testdata_file("CT_small.dcm"), src / f"ct{i}.dcm")
    (src / "killer.dcm").write_bytes(b"kill")
    real_read = pipeline._read

    def read(path: Path, max_bytes: int):
        if path.name == "killer.dcm":
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        return real_read(path, max_bytes)

    monkeypatch.setattr(pipeline, "_read", read)  # workers are forked: they see it too
    runner = DicomDeidentifier(ProfileOptions(), Keyring(SECRET))
    summary = runner.run(src, tmp_path / "out", progress=False, workers=2)
    by = {r.path: r for r in summary.records}
    assert by["killer.dcm"].status == "failed" and "worker process" in by["killer.dcm"].reason
    assert sum(r.status == "deidentified" for r in summary.records) == 9
    # A batch killed after some files: the journal keeps them and --resume does only the rest.
    manifest = tmp_path / "out" / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:5]) + '\n{"kind": "file", "inp')  # killed mid-line
    monkeypatch.undo()  # killer.dcm failed, so it is retried: now as the bad file it is
    again = runner.run(src, tmp_path / "out", progress=False, workers=1, resume=True)
    assert again.resumed >= 3 and len(again.records) == 10 - again.resumed
    assert read_manifest(manifest)["counts"]["deidentified"] == 9


def test_header_only_cli_does_not_import_torch_and_exits_by_the_convention(phi, tmp_path) -> None:
    root, _ = phi
    key = tmp_path / "key"
    key.write_text(SECRET.hex())
    code = (
        "import sys; from fedeid.cli import main; rc = main(sys.argv[1:]); "
        "print('torch' in sys.modules); sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-c", code, "dicom", "deid"]
    ok = subprocess.run([*base, str(root), str(tmp_path / "o1"), "--secret-file", str(key), "--path-map",
                         str(tmp_path / "map.jsonl")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1] == "False", ok.stderr
    assert "王小明" in (tmp_path / "map.jsonl").read_text(encoding="utf-8")  # the site's own map names inputs
    (tmp_path / "empty").mkdir()
    empty = subprocess.run([*base, str(tmp_path / "empty"), str(tmp_path / "o2"), "--secret-file", str(key)],
                           capture_output=True, text=True, env=env)
    assert empty.returncode == 2 and "no files" in empty.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.dcm").write_bytes(b"not dicom")
    failed = subprocess.run([*base, str(bad), str(tmp_path / "o3"), "--secret-file", str(key)],
                            capture_output=True, text=True, env=env)
    assert failed.returncode == 1 and "fedeid: x.dcm: failed: not a DICOM file" in failed.stderr


def test_descriptor_cleaner_erases_whole_tokens_of_every_collected_identifier() -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from fedeid.dicom.scrub import Scrubber, collect

    ds = Dataset()
    ds.PatientName = "王^小明"
    ds.OtherPatientNames = "Müller-Peña^José"
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = "ALT-998877"
    ds.ScheduledProcedureStepSequence = Sequence([Dataset()])
    ds.ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName = "Okafor^Ngozi"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1"
    scrub = Scrubber(collect(ds))
    text = (
        "王医生 小明 Johnny MULLER pena Jose, ID ALT998877 / ALT-998877, seen by Dr Okafor; "
        "born 17.03.1958 (29/01/1977, 03/17/1958, 1958-03-17, 1991年8月5日, 5 August 1991), "
        "see 1.2.826.0.1.3680043.2.1125.1, call +44 20 7946 0958"
    )
    cleaned = scrub(text)
    for gone in ("王", "小明", "MULLER", "pena", "Jose", "998877", "Okafor", "1958", "1977", "1991", "1.2.826", "7946"):
        assert gone not in cleaned, (gone, cleaned)
    assert "Johnny" in cleaned and "医生" in cleaned and "seen by Dr" in cleaned
    assert "***ny" not in cleaned


def test_a_batch_killed_mid_run_leaves_its_journal_and_resumes(tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(60):
        shutil.copyfile(pydicom.data.get_testdata_file("CT_small.dcm"), src / f"ct{i:02d}.dcm")
    key = tmp_path / "key"
    key.write_text(SECRET.hex())
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "import sys; from fedeid.cli import main; sys.exit(main())", "dicom", "deid",
           str(src), str(out), "--secret-file", str(key), "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    journal = out / MANIFEST_NAME
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and (not journal.exists() or journal.read_text().count('"kind": "file"') < 3):
            time.sleep(0.01)
    finally:
        proc.kill()  # SIGKILL: no handler runs, as when the machine or the operator kills it
        proc.wait()
    before = read_manifest(journal)
    assert before["runs"] and before["counts"]["deidentified"] >= 3
    if before["complete"]:
        pytest.skip("the batch finished before it could be killed (machine too fast for this test)")
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = read_manifest(journal)
    assert after["complete"] and after["counts"]["deidentified"] == 60 and len(after["runs"]) == 2
    assert f"{before['counts']['deidentified']} already done by an earlier run" in done.stdout
