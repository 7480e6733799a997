"""The batch: a folder of DICOM in, a mirrored folder of de-identified DICOM out, one manifest.

Each file is read, checked, de-identified (pixels through the model when a model is given, then
the header profile) and written atomically; a file that cannot be de-identified is refused
(a deliberate no: colour, untrained modality, burned-in text that would survive) or failed
(malformed: truncated, not DICOM, undecodable pixels) with its reason, and the batch goes on. The
input tree is only ever read. The manifest names inputs and outputs by their mirrored relative
paths, in which any component carrying an identifier of the file (a UID, a patient ID or name,
an accession number) is replaced by its keyed mapping, so the manifest holds no identifier either.
"""

from __future__ import annotations

import io
import multiprocessing
import re
import time
import uuid
import warnings
from collections import Counter
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)
from tqdm import tqdm

from fedeid import __version__
from fedeid.dicom.pixels import PixelModel, deidentify_pixels, refusal
from fedeid.dicom.profile import HeaderProfile, ProfileOptions, collect_identifiers
from fedeid.dicom.pseudonyms import Keyring
from fedeid.io import atomic_write_bytes, atomic_write_json

MANIFEST_NAME = "fedeid-manifest.json"
WRITER_THREADS = 4
STATUSES = ("deidentified", "refused", "failed", "skipped")
_UID_COMPONENT = re.compile(r"^(\d+(?:\.\d+){2,})(\.[A-Za-z][A-Za-z0-9]{0,4})?$")
_UID_IN_TEXT = re.compile(r"\d+(?:\.\d+){3,}")
IMPLEMENTATION_VERSION = f"FEDEID_{__version__}"[:16]
# fedeid's own Implementation Class UID: a UUID-derived UID (PS3.5 B.2) fixed by name, so outputs
# carry no other implementation's root (and no UID prefix shared with the inputs' creators).
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:fedeid:dicom:implementation').int}"


class Refused(Exception):
    """This file is deliberately not de-identified; the message says why."""


class Failed(Exception):
    """This file is malformed or cannot be processed; the message says why."""


@dataclass
class FileRecord:
    """One manifest row: no original identifier in any field."""

    input: str
    output: str
    status: str
    reason: str = ""
    frames: int | None = None
    blocked_fraction: float | None = None


@dataclass
class RunSummary:
    """Counts and rows of one run; ``counts`` has every status, zero or not."""

    records: list[FileRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(r.status for r in self.records)
        return {s: c.get(s, 0) for s in STATUSES}

    def line(self) -> str:
        c = self.counts
        rate = len(self.records) / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{len(self.records)} files: {c['deidentified']} de-identified, {c['refused']} refused, "
            f"{c['failed']} failed, {c['skipped']} skipped in {self.seconds:.1f} s ({rate:.1f} files/s)"
        )


class DicomDeidentifier:
    """One configured run: profile options, site keys and (for pixel mode) a model and level."""

    def __init__(
        self,
        options: ProfileOptions,
        keyring: Keyring,
        model: PixelModel | None = None,
        level: float | None = None,
        batch_size: int = 16,
    ) -> None:
        if (model is None) != (level is None):
            raise ValueError("pixel mode needs both a model and a level; header-only mode neither")
        if level is not None and model is not None:
            lo, hi = model.level_range
            if not (0.0 <= level <= 1.0) or not (lo <= level <= hi):
                raise ValueError(f"level {level} is outside [0, 1] or the model's trained range [{lo}, {hi}]")
        self.options = options
        self.keys = keyring
        self.model = model
        self.level = level
        self.batch_size = batch_size
        self.profile = HeaderProfile(options, keyring)

    @property
    def mode(self) -> str:
        return "header-only" if self.model is None else "pixel"

    # -- one file ---------------------------------------------------------------------------
    def process(self, src: Path, rel: Path, out_root: Path) -> FileRecord:
        """De-identify one file into ``out_root``; never raises for a bad file."""
        record, payload = self.prepare(src, rel)
        return record if payload is None else _write(record, payload, out_root)

    def prepare(self, src: Path, rel: Path) -> tuple[FileRecord, bytes | None]:
        """The manifest row of one file and, if it was de-identified, the bytes to write."""
        identifiers: set[str] = set()
        safe_rel = self.safe_path(rel, identifiers)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = _read(src)
                identifiers = collect_identifiers(ds)
                safe_rel = self.safe_path(rel, identifiers)
                if _is_dicomdir(ds):
                    reason = (
                        "DICOMDIR: a media index listing patients and studies; not copied "
                        "(build a new one over the outputs if media need it)"
                    )
                    return FileRecord(str(safe_rel), "", "skipped", reason), None
                data = self._deidentify(ds)
        except Refused as exc:
            return FileRecord(str(safe_rel), "", "refused", self._scrub(str(exc), identifiers, src, safe_rel)), None
        except Failed as exc:
            return FileRecord(str(safe_rel), "", "failed", self._scrub(str(exc), identifiers, src, safe_rel)), None
        except Exception as exc:  # any other fault of this file: report it, go on with the batch
            reason = f"{type(exc).__name__}: {exc}"
            return FileRecord(str(safe_rel), "", "failed", self._scrub(reason, identifiers, src, safe_rel)), None
        record = FileRecord(str(safe_rel), str(safe_rel), "deidentified", "", data.frames, data.blocked)
        return record, data.payload

    def records(self, jobs: Iterable[tuple[Path, Path, Path]]) -> Iterator[FileRecord]:
        """Process ``(src, rel, out_root)`` jobs in order, writing on background threads.

        Each output is fsynced before its rename (fedeid.io); a few writer threads let that wait
        overlap the parsing of the next files instead of adding to it.
        """
        with ThreadPoolExecutor(WRITER_THREADS) as io_pool:
            pending: deque[Future[FileRecord] | FileRecord] = deque()
            for src, rel, out_root in jobs:
                record, payload = self.prepare(src, rel)
                pending.append(record if payload is None else io_pool.submit(_write, record, payload, out_root))
                while pending and (len(pending) > 2 * WRITER_THREADS or _ready(pending[0])):
                    yield _result(pending.popleft())
            while pending:
                yield _result(pending.popleft())

    def _deidentify(self, ds: Dataset) -> _Output:
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise Failed("no SOP Class/Instance UID: not a DICOM composite instance that can be written back")
        _check_complete(ds)
        frames: int | None = None
        blocked: float | None = None
        extra_codes: list[str] = []
        notes: list[str] = []
        burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"
        if self.model is None or self.level is None:
            if burned_in:
                raise Refused(
                    "Burned In Annotation is YES: header-only mode cannot remove text burned into the "
                    "pixels; use pixel mode at level 1"
                )
            _check_native_length(ds)
        else:
            why = refusal(ds, self.model)
            if why:
                raise Refused(why)
            if "PixelData" not in ds:
                if "Rows" in ds:
                    raise Failed("missing Pixel Data: the image attributes are there, the pixels are not")
                raise Refused("no pixel data to de-identify (not an image); use header-only mode")
            if burned_in and self.level < 1.0:
                raise Refused(
                    f"Burned In Annotation is YES: below level 1 (here {self.level:g}) the model keeps the "
                    "patches it does not judge identity-bearing, so burned-in text may survive"
                )
            try:
                result = deidentify_pixels(ds, self.model, self.level, self.batch_size)
            except (Refused, Failed):
                raise
            except Exception as exc:
                syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
                name = getattr(syntax, "name", str(syntax))
                raise Failed(f"cannot decode or rewrite the pixel data ({name}): {type(exc).__name__}: {exc}") from exc
            frames, blocked = result.frames, round(result.blocked_fraction, 6)
            notes.append(f"fedeid pixel de-identification, level {self.level:g}")
            if self.level >= 1.0:
                # Every patch blocked and synthesised: no source pixel, so no burned-in text, survives.
                extra_codes.append("113101")
                if "BurnedInAnnotation" in ds:
                    ds.BurnedInAnnotation = "NO"
        self.profile.apply(ds, extra_codes=extra_codes, method_notes=notes)
        return _Output(_encode(ds), frames, blocked)

    # -- names ------------------------------------------------------------------------------
    def safe_path(self, rel: Path, identifiers: set[str]) -> Path:
        """``rel`` with every component that carries an identifier replaced by its keyed mapping.

        UID-named components become the keyed replacement UID (so a file named by its SOP Instance
        UID is named by the new one); components containing a patient name, ID or other collected
        identifier of 4+ characters become a keyed token. Deterministic under one secret.
        """
        long_ids = [s.lower() for s in identifiers if len(s) >= 4]
        parts = []
        for part in rel.parts:
            m = _UID_COMPONENT.match(part)
            if m and len(m.group(1)) >= 8:
                parts.append(self.keys.uid(m.group(1)) + (m.group(2) or ""))
            elif any(i in part.lower() for i in long_ids):
                suffix = Path(part).suffix if len(Path(part).suffix) <= 6 else ""
                parts.append(self.keys.token(part) + suffix)
            else:
                parts.append(part)
        return Path(*parts)

    def _scrub(self, reason: str, identifiers: set[str], src: Path, safe_rel: Path) -> str:
        text = (reason.strip().splitlines() or [""])[0].replace(str(src), str(safe_rel))
        for ident in sorted(identifiers, key=len, reverse=True):
            if len(ident) >= 3:
                text = re.sub(re.escape(ident), "***", text, flags=re.IGNORECASE)
        text = _UID_IN_TEXT.sub("<uid>", text)
        return text[:300]

    # -- a tree -----------------------------------------------------------------------------
    def run(
        self,
        in_dir: str | Path,
        out_dir: str | Path,
        manifest: str | Path | None = None,
        progress: bool = True,
        workers: int = 1,
    ) -> RunSummary:
        """De-identify every file under ``in_dir`` into ``out_dir`` and write the manifest.

        ``workers`` > 1 spreads header-only runs over that many processes: the work is per file
        and independent, and each worker's fsync then overlaps the others' parsing. Pixel mode
        stays in this process, where the model already uses torch's threads.
        """
        src_root = Path(in_dir).resolve()
        out_root = Path(out_dir).resolve()
        if not src_root.is_dir():
            raise FileNotFoundError(f"{in_dir}: no such folder")
        if out_root == src_root or src_root in out_root.parents or out_root in src_root.parents:
            raise ValueError("OUT must be outside IN (and IN outside OUT): inputs are never modified")
        files = sorted(p for p in src_root.rglob("*") if p.is_file() and not p.is_symlink())
        summary = RunSummary()
        start = time.perf_counter()
        jobs = [(path, path.relative_to(src_root), out_root) for path in files]
        bar = tqdm(total=len(jobs), desc=f"dicom de-id ({self.mode})", unit="file", disable=not progress)
        if workers > 1 and self.model is None and len(jobs) > workers:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            size = max(1, min(32, len(jobs) // (4 * workers)))
            chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(self,)) as pool:
                for chunk in pool.map(_work, chunks):
                    summary.records.extend(chunk)
                    bar.update(len(chunk))
        else:
            for record in self.records(jobs):
                summary.records.append(record)
                bar.update()
        bar.close()
        summary.seconds = time.perf_counter() - start
        atomic_write_json(Path(manifest) if manifest else out_root / MANIFEST_NAME, self.manifest(summary))
        return summary

    def manifest(self, summary: RunSummary) -> dict[str, Any]:
        return {
            "fedeid_version": __version__,
            "mode": self.mode,
            "level": self.level,
            "profile": "PS3.15 Annex E Basic Application Level Confidentiality Profile",
            "options": self.options.to_dict(),
            "method_codes": self.options.method_codes(),
            "key_fingerprint": self.keys.fingerprint,
            "model": None
            if self.model is None
            else {"image_size": self.model.image_size, "modalities": list(self.model.modalities)},
            "counts": summary.counts,
            "seconds": round(summary.seconds, 3),
            "files": [asdict(r) for r in summary.records],
        }


_WORKER: DicomDeidentifier | None = None


def _init_worker(runner: DicomDeidentifier) -> None:
    global _WORKER
    _WORKER = runner


def _work(jobs: list[tuple[Path, Path, Path]]) -> list[FileRecord]:
    assert _WORKER is not None, "worker used before its initializer ran"
    return list(_WORKER.records(jobs))


def _write(record: FileRecord, payload: bytes, out_root: Path) -> FileRecord:
    try:
        atomic_write_bytes(out_root / record.output, payload)
    except OSError as exc:
        return FileRecord(record.input, "", "failed", f"cannot write the output: {exc.strerror or exc}")
    return record


def _ready(item: Future[FileRecord] | FileRecord) -> bool:
    return not isinstance(item, Future) or item.done()


def _result(item: Future[FileRecord] | FileRecord) -> FileRecord:
    return item.result() if isinstance(item, Future) else item


@dataclass
class _Output:
    payload: bytes
    frames: int | None
    blocked: float | None


def _read(path: Path) -> Dataset:
    """Read a DICOM file (Part 10, or a bare dataset that still names its SOP instance)."""
    try:
        return dcmread(path)
    except InvalidDicomError:
        pass
    try:
        ds = dcmread(path, force=True)
    except Exception as exc:
        raise Failed(f"not a DICOM file (no DICM preamble, and no readable dataset: {type(exc).__name__})") from exc
    if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
        raise Failed("not a DICOM file (no DICM preamble, and no SOP Class/Instance UID when read as a bare dataset)")
    return ds


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return sop == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds


def _check_complete(ds: Dataset) -> None:
    """A file cut short leaves its last element with fewer bytes than its length says: refuse to
    write a half element back (pydicom reads such files without complaint)."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if isinstance(value, bytes) and length is not None and length != 0xFFFFFFFF and len(value) < length:
            raise Failed(f"truncated file: element {tag} has {len(value)} of its {length} bytes")


def _check_native_length(ds: Dataset) -> None:
    """A truncated uncompressed Pixel Data would be copied short: say so instead."""
    data = ds.get("PixelData")
    if data is None or not all(k in ds for k in ("Rows", "Columns", "BitsAllocated")):
        return
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and UID(syntax).is_encapsulated:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated) * int(ds.Rows) * int(ds.Columns) * frames * samples
    expected = (bits + 7) // 8
    have = len(data)
    if have < expected:
        raise Failed(f"truncated Pixel Data: {have} bytes where {expected} are needed")


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax:
        # Deflate is inflated: few readers (dciodvfy among them) take it, and it is lossless.
        return ExplicitVRLittleEndian if UID(syntax).is_deflated else UID(syntax)
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _encode(ds: Dataset) -> bytes:
    """Part 10 bytes with a fresh File Meta Information consistent with the de-identified dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = _transfer_syntax(ds)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    buf = io.BytesIO()
    # dcmwrite (not save_as) so a big-endian source can be written little endian in pixel mode.
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
