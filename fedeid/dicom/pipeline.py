"""The batch: a folder of DICOM in, a folder of de-identified DICOM out, and a manifest journal.

Each file is read, checked whole (size caps, inflated size, every element complete) before any
value of it is used, de-identified (pixels through the model when a model is given, then the
header profile) and written atomically; a file that cannot be de-identified is refused (a
deliberate no: colour, untrained modality, burned-in text that would survive, over a size cap)
or failed (malformed: truncated, not DICOM, undecodable pixels) with a reason a person can read,
and the batch goes on. The input tree is only ever read.

Nothing of the input's names reaches the outputs: an output is named from its new identifiers,
``<patient pseudonym>/<study UID>/<series UID>/<instance UID>.dcm``, and the manifest names each
input by a keyed hash of its relative path (``Keyring.token``); the site may keep the hash → path
table in a separate file (``path_map``), never inside OUT.

The manifest is a journal (JSON lines: a run header, one line per file as it finishes, a summary
line at the end), flushed line by line, so a killed worker or a killed batch leaves every finished
file recorded and ``resume`` skips them. Each output is fsynced before its journal line is written;
the journal itself is fsynced at least once a second and at the end (a power cut can lose the
last second of lines, and a resumed run then redoes those files, to the same bytes).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import stat
import struct
import tempfile
import time
import uuid
import warnings
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import IO, Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from fedeid import __version__
from fedeid.dicom.pixels import PixelModel, deidentify_pixels, refusal
from fedeid.dicom.profile import HeaderProfile, ProfileOptions
from fedeid.dicom.pseudonyms import Keyring
from fedeid.progress import Progress

MANIFEST_NAME = "fedeid-manifest.jsonl"
WRITER_THREADS = 4
# Files per task sent to a worker process: big enough that task overhead stays small, small
# enough that the files suspected when a worker dies are few (each is then retried alone).
CHUNK_FILES = 8
STATUSES = ("deidentified", "refused", "failed", "skipped")
# Statuses a resumed run does not redo: a failure may have been transient (a killed worker).
FINAL_STATUSES = frozenset({"deidentified", "refused", "skipped"})
# Default cap on a file's size, its inflated size (deflate) and its decoded pixels.
DEFAULT_MAX_BYTES = 1 << 30
DEFLATED_SYNTAXES = frozenset({DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.8.1"})  # + Deflated Image Frame
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
_UID_VALUE = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")
IMPLEMENTATION_VERSION = f"FEDEID_{__version__}"[:16]
# fedeid's own Implementation Class UID: a UUID-derived UID (PS3.5 B.2) fixed by name, so outputs
# carry no other implementation's root (and no UID prefix shared with the inputs' creators).
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:fedeid:dicom:implementation').int}"
WORKER_DIED = (
    "the worker process de-identifying this file died (killed by the system, e.g. for lack of "
    "memory, or crashed); the file was retried alone and killed its worker again"
)

Job = tuple[Path, Path, Path]  # (input file, its path relative to IN, OUT)


class Refused(Exception):
    """This file is deliberately not de-identified; the message says why."""


class Failed(Exception):
    """This file is malformed or cannot be processed; the message says why."""


@dataclass
class FileRecord:
    """One manifest row: no original identifier and no input name in any field.

    ``input`` is the keyed hash of the input's relative path; ``path`` (that path itself) is kept
    for the operator's terminal and the site's path map and never written to the manifest.
    """

    input: str
    output: str
    status: str
    reason: str = ""
    frames: int | None = None
    blocked_fraction: float | None = None
    path: str = field(default="", compare=False)

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        del row["path"]
        return row


@dataclass
class RunSummary:
    """Counts and rows of one run; ``counts`` has every status, zero or not."""

    records: list[FileRecord] = field(default_factory=list)
    seconds: float = 0.0
    resumed: int = 0  # files a previous run had finished, not redone

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(r.status for r in self.records)
        return {s: c.get(s, 0) for s in STATUSES}

    def line(self) -> str:
        c = self.counts
        rate = len(self.records) / self.seconds if self.seconds > 0 else 0.0
        done = f", {self.resumed} already done by an earlier run" if self.resumed else ""
        return (
            f"{len(self.records)} files: {c['deidentified']} de-identified, {c['refused']} refused, "
            f"{c['failed']} failed, {c['skipped']} skipped{done} in {self.seconds:.1f} s ({rate:.1f} files/s)"
        )


class Journal:
    """An append-only JSON-lines file, flushed line by line and fsynced at least every second.

    A flushed line is in the kernel, so it survives the death of this process; the periodic fsync
    bounds what a power cut can take.
    """

    SYNC_SECONDS = 1.0

    def __init__(self, path: Path, append: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if append and path.exists():
            _drop_torn_line(path)
        self._fh: IO[str] = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self._synced = time.monotonic()

    def write(self, obj: dict[str, Any]) -> None:
        self._fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._fh.flush()
        if time.monotonic() - self._synced > self.SYNC_SECONDS:
            os.fsync(self._fh.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


def _drop_torn_line(path: Path) -> None:
    """Cut a last line its writer was killed in the middle of, so appended lines stay lines."""
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A manifest journal as one object: its run headers, the latest row of each input (in the
    order first seen), their counts, and whether the last run finished (ended with a summary).

    A torn last line (the writer killed mid-line) is ignored; a torn line elsewhere is an error.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    runs: list[dict[str, Any]] = []
    files: dict[str, dict[str, Any]] = {}
    complete = False
    for n, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {n + 1} is not a manifest line (the file was edited or damaged)") from None
        kind = obj.pop("kind", None)
        complete = kind == "summary"
        if kind == "run":
            runs.append(obj)
        elif kind == "file":
            files[obj["input"]] = obj
    counts = Counter(r["status"] for r in files.values())
    return {
        "runs": runs,
        "files": list(files.values()),
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "complete": complete,
    }


class DicomDeidentifier:
    """One configured run: profile options, site keys and (for pixel mode) a model and level."""

    def __init__(
        self,
        options: ProfileOptions,
        keyring: Keyring,
        model: PixelModel | None = None,
        level: float | None = None,
        batch_size: int = 16,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if (model is None) != (level is None):
            raise ValueError("pixel mode needs both a model and a level; header-only mode neither")
        if level is not None and model is not None:
            lo, hi = model.level_range
            if not (0.0 <= level <= 1.0) or not (lo <= level <= hi):
                raise ValueError(f"level {level} is outside [0, 1] or the model's trained range [{lo}, {hi}]")
        if max_bytes < 1 << 20:
            raise ValueError("the size cap must be at least 1 MiB")
        self.options = options
        self.keys = keyring
        self.model = model
        self.level = level
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.profile = HeaderProfile(options, keyring)

    @property
    def mode(self) -> str:
        return "header-only" if self.model is None else "pixel"

    # -- one file ---------------------------------------------------------------------------
    def process(self, src: Path, rel: Path, out_root: Path) -> FileRecord:
        """De-identify one file into ``out_root``; never raises for a bad file."""
        record, payload = self.prepare(src, rel)
        return record if payload is None else _write(record, payload, out_root)

    def input_key(self, rel: Path) -> str:
        """The manifest's name for an input: a keyed hash of its relative path."""
        return self.keys.token(rel.as_posix())

    def prepare(self, src: Path, rel: Path) -> tuple[FileRecord, bytes | None]:
        """The manifest row of one file and, if it was de-identified, the bytes to write."""
        key, path = self.input_key(rel), rel.as_posix()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = _read(src, self.max_bytes)
                _check_complete(ds)  # before any value is used: reading a value hides its length
                if _is_dicomdir(ds):
                    reason = (
                        "DICOMDIR: a media index listing patients and studies; not copied "
                        "(build a new one over the outputs if media need it)"
                    )
                    return FileRecord(key, "", "skipped", reason, path=path), None
                data = self._deidentify(ds)
        except Refused as exc:
            return FileRecord(key, "", "refused", str(exc), path=path), None
        except Failed as exc:
            return FileRecord(key, "", "failed", str(exc), path=path), None
        except Exception as exc:  # any other fault of this file: report it, go on with the batch
            return FileRecord(key, "", "failed", explain(exc), path=path), None
        record = FileRecord(key, data.name, "deidentified", "", data.frames, data.blocked, path=path)
        return record, data.payload

    def records(self, jobs: Iterable[Job]) -> Iterator[FileRecord]:
        """Process jobs in order, writing on background threads.

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
            _check_pixel_data(ds)
        else:
            why = refusal(ds, self.model)
            if why:
                raise Refused(why)
            if "PixelData" not in ds:
                if "Rows" in ds:
                    raise Failed("missing Pixel Data: the image attributes are there, the pixels are not")
                raise Refused("no pixel data to de-identify (not an image); use header-only mode")
            _check_pixel_data(ds)
            if burned_in and self.level < 1.0:
                raise Refused(
                    f"Burned In Annotation is YES: below level 1 (here {self.level:g}) the model keeps the "
                    "patches it does not judge identity-bearing, so burned-in text may survive"
                )
            decoded = _decoded_bytes(ds)
            if decoded > self.max_bytes:
                raise Refused(
                    f"the decoded pixels would take {decoded / 2**20:.0f} MiB, over the "
                    f"{self.max_bytes / 2**20:.0f} MiB cap (--max-mb)"
                )
            try:
                result = deidentify_pixels(ds, self.model, self.level, self.batch_size)
            except (Refused, Failed):
                raise
            except Exception as exc:
                syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
                name = getattr(syntax, "name", str(syntax))
                raise Failed(
                    f"the pixel data cannot be decoded or rewritten ({name}; {type(exc).__name__}): "
                    "damaged, or a compression no installed decoder handles"
                ) from exc
            frames, blocked = result.frames, round(result.blocked_fraction, 6)
            notes.append(f"fedeid pixel de-identification, level {self.level:g}")
            if self.level >= 1.0:
                # Every patch blocked and synthesised: no source pixel, so no burned-in text, survives.
                extra_codes.append("113101")
                if "BurnedInAnnotation" in ds:
                    ds.BurnedInAnnotation = "NO"
        pseudonym = self.profile.apply(ds, extra_codes=extra_codes, method_notes=notes)
        return _Output(_encode(ds), self.output_name(ds, pseudonym), frames, blocked)

    def output_name(self, ds: Dataset, pseudonym: str) -> str:
        """``<patient pseudonym>/<study>/<series>/<instance>.dcm`` from the de-identified values:
        nothing of the input's file or folder names. A value that is not a plain UID (a crafted
        file under Retain UIDs) is named by its keyed token instead."""
        parts = [pseudonym or "NO-PATIENT"]
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = str(ds.get(keyword, "") or "").strip()
            parts.append(value if _UID_VALUE.fullmatch(value) and len(value) <= 64 else self.keys.token(value))
        return "/".join(parts) + ".dcm"

    # -- a tree -----------------------------------------------------------------------------
    def run(
        self,
        in_dir: str | Path,
        out_dir: str | Path,
        manifest: str | Path | None = None,
        progress: bool = True,
        workers: int = 1,
        resume: bool = False,
        path_map: str | Path | None = None,
    ) -> RunSummary:
        """De-identify every file under ``in_dir`` into ``out_dir``, journaling each in the manifest.

        ``workers`` > 1 spreads header-only runs over that many processes: the work is per file
        and independent, and each worker's fsync then overlaps the others' parsing. Pixel mode
        stays in this process, where the model already uses torch's threads. ``resume`` skips
        the inputs the manifest already records as done (same key and options required).
        ``path_map`` names a JSON-lines file (outside OUT) the site keeps: input hash → path.
        """
        src_root = Path(in_dir).resolve()
        out_root = Path(out_dir).resolve()
        if not src_root.is_dir():
            raise FileNotFoundError(f"{in_dir}: no such folder")
        if out_root == src_root or src_root in out_root.parents or out_root in src_root.parents:
            raise ValueError("OUT must be outside IN (and IN outside OUT): inputs are never modified")
        manifest_path = Path(manifest) if manifest else out_root / MANIFEST_NAME
        if src_root in manifest_path.resolve().parents:
            raise ValueError("the manifest must be outside IN: inputs are never modified")
        map_path = Path(path_map).resolve() if path_map else None
        if map_path is not None and (out_root in map_path.parents or src_root in map_path.parents):
            raise ValueError("the path map names the inputs: keep it outside OUT (and IN), where the site keeps its key")
        files, others = _scan(src_root)
        header = self.header()
        done: set[str] = set()
        if resume and manifest_path.exists():
            prior = read_manifest(manifest_path)
            if prior["runs"] and _comparable(prior["runs"][-1]) != _comparable(header):
                raise ValueError(
                    f"{manifest_path}: --resume needs the key, mode and options of the run that wrote it"
                )
            done = {r["input"] for r in prior["files"] if r["status"] in FINAL_STATUSES}
        append = resume and manifest_path.exists()
        journal = Journal(manifest_path, append=append)
        names = Journal(map_path, append=resume and map_path.exists()) if map_path else None
        if map_path is not None:
            map_path.chmod(0o600)
        summary = RunSummary()
        start = time.perf_counter()
        jobs = [(p, p.relative_to(src_root), out_root) for p in files]
        todo = [job for job in jobs if self.input_key(job[1]) not in done]
        summary.resumed = len(jobs) - len(todo)
        bar = Progress(len(todo) + len(others), f"dicom de-id ({self.mode})", "file", enabled=progress)
        try:
            journal.write({"kind": "run", **header})
            skipped = (FileRecord(self.input_key(rel), "", "skipped", why, path=rel.as_posix()) for rel, why in
                       ((p.relative_to(src_root), why) for p, why in others))
            pool = workers > 1 and self.model is None and len(todo) > workers
            # chain, not a tuple: each record is journaled the moment its file is done.
            for record in chain(skipped, self._pooled(todo, workers) if pool else self.records(todo)):
                journal.write({"kind": "file", **record.row()})
                if names is not None:
                    names.write({"input": record.input, "path": record.path})
                summary.records.append(record)
                bar.update()
            summary.seconds = time.perf_counter() - start
            journal.write({"kind": "summary", "counts": summary.counts, "seconds": round(summary.seconds, 3)})
        finally:
            bar.close()
            journal.close()
            if names is not None:
                names.close()
        return summary

    def _pooled(self, jobs: list[Job], workers: int) -> Iterator[FileRecord]:
        """Run jobs on worker processes, restarting the pool when a worker dies.

        When a worker dies every task in flight fails with it; their files are suspects and are
        retried one at a time in a one-process pool, so the file that kills its worker again is
        found and reported failed while every other file is de-identified.
        """
        queue = deque(jobs[i : i + CHUNK_FILES] for i in range(0, len(jobs), CHUNK_FILES))
        while queue:
            suspects: list[Job] = []
            with self._pool(workers) as pool:
                inflight: dict[Future[list[FileRecord]], list[Job]] = {}
                while queue or inflight:
                    while queue and len(inflight) < 2 * workers:
                        chunk = queue.popleft()
                        inflight[pool.submit(_work, chunk)] = chunk
                    finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                    for future in finished:
                        chunk = inflight.pop(future)
                        try:
                            yield from future.result()
                        except BrokenProcessPool:
                            suspects.extend(chunk)
                    if suspects:
                        for chunk in inflight.values():
                            suspects.extend(chunk)
                        break
            yield from self._isolated(sorted(suspects))

    def _isolated(self, jobs: list[Job]) -> Iterator[FileRecord]:
        pool: ProcessPoolExecutor | None = None
        try:
            for job in jobs:
                pool = pool or self._pool(1)
                try:
                    yield from pool.submit(_work, [job]).result()
                except BrokenProcessPool:
                    pool.shutdown(wait=True)
                    pool = None
                    rel = job[1]
                    yield FileRecord(self.input_key(rel), "", "failed", WORKER_DIED, path=rel.as_posix())
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _pool(self, workers: int) -> ProcessPoolExecutor:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(self,))

    def header(self) -> dict[str, Any]:
        """The run line of the manifest: how the files were de-identified, no identifier."""
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
            "max_bytes": self.max_bytes,
        }


def _comparable(header: dict[str, Any]) -> dict[str, Any]:
    return {k: header.get(k) for k in ("mode", "level", "options", "key_fingerprint", "model")}


_WORKER: DicomDeidentifier | None = None


def _init_worker(runner: DicomDeidentifier) -> None:
    global _WORKER
    _WORKER = runner


def _work(jobs: list[Job]) -> list[FileRecord]:
    assert _WORKER is not None, "worker used before its initializer ran"
    return list(_WORKER.records(jobs))


def _write(record: FileRecord, payload: bytes, out_root: Path) -> FileRecord:
    try:
        name = _claim(out_root / record.output, payload)
    except OSError as exc:
        reason = f"the output could not be written: {exc.strerror or 'an operating-system error'}"
        return FileRecord(record.input, "", "failed", reason, path=record.path)
    return replace(record, output=name.relative_to(out_root).as_posix())


def _claim(target: Path, payload: bytes) -> Path:
    """Write ``payload`` atomically at ``target``, or at ``<stem>.<n>.dcm`` when another input of
    this run (the same SOP instance in another encoding, say) already holds ``target``.

    The name is claimed with ``os.link``, which fails if the name exists, so processes writing in
    parallel never overwrite each other; an existing file with the same bytes is this output
    already (a rerun) and is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".fedeid.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        for n in range(1000):
            path = target if n == 0 else target.with_name(f"{target.stem}.{n}{target.suffix}")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                if path.stat().st_size == len(payload) and path.read_bytes() == payload:
                    return path
        raise OSError(0, "a thousand input files hold this one SOP instance")
    finally:
        Path(tmp).unlink(missing_ok=True)


def _ready(item: Future[FileRecord] | FileRecord) -> bool:
    return not isinstance(item, Future) or item.done()


def _result(item: Future[FileRecord] | FileRecord) -> FileRecord:
    return item.result() if isinstance(item, Future) else item


@dataclass
class _Output:
    payload: bytes
    name: str
    frames: int | None
    blocked: float | None


# What a fault of a malformed file means, in words (the exception's own text can quote values).
_EXPLANATIONS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (MemoryError, "it needs more memory than this machine can give"),
    (RecursionError, "its sequences are nested too deeply to walk"),
    (UnicodeError, "a text value cannot be decoded in the character set the file declares"),
    ((EOFError, struct.error, OverflowError, zlib.error), "an element's length runs past the end of its data"),
    (ValueError, "a value does not fit its value representation"),
    ((KeyError, IndexError, AttributeError, TypeError), "an element has a structure the standard does not allow"),
)


def explain(exc: BaseException) -> str:
    """A sentence for a fault of one file, naming the kind of damage, never quoting its values."""
    if isinstance(exc, OSError):
        return f"the file could not be read: {exc.strerror or 'an operating-system error'}"
    for kinds, text in _EXPLANATIONS:
        if isinstance(exc, kinds):
            return f"malformed: {text}, so it was not de-identified ({type(exc).__name__})"
    return f"could not be de-identified: an unexpected fault while processing it ({type(exc).__name__})"


def _scan(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Regular files under ``root`` (symlinks never followed), and every other entry with why it
    is skipped, both sorted."""
    files: list[Path] = []
    others: list[tuple[Path, str]] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            others.append((folder, f"a folder that cannot be listed: {exc.strerror or 'an operating-system error'}"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as exc:
                others.append((path, f"cannot be examined: {exc.strerror or 'an operating-system error'}"))
                continue
            if stat.S_ISREG(mode):
                files.append(path)
            elif stat.S_ISDIR(mode):
                stack.append(path)
                if path.suffix.lower() in DICOM_SUFFIXES:
                    others.append((path, "a folder named like a DICOM file, not a file: the files in it are processed"))
            elif stat.S_ISLNK(mode):
                others.append((path, "a symbolic link: not followed (it could lead outside IN, or loop)"))
            elif stat.S_ISFIFO(mode):
                others.append((path, "a named pipe (FIFO), not a regular file: not read (reading it could block)"))
            elif stat.S_ISSOCK(mode):
                others.append((path, "a socket, not a regular file: not read"))
            else:
                others.append((path, "a device or other special file, not a regular file: not read"))
    return sorted(files), sorted(others)


def _read(path: Path, max_bytes: int) -> Dataset:
    """Read a DICOM file (Part 10, or a bare dataset that still names its SOP instance), refusing
    one whose size or inflated size exceeds ``max_bytes`` before reading it whole."""
    size = path.stat().st_size
    if size > max_bytes:
        raise Refused(f"the file is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB cap (--max-mb)")
    _check_inflated_size(path, max_bytes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = dcmread(path)
        except InvalidDicomError:
            try:
                ds = dcmread(path, force=True)
            except Exception as exc:
                raise Failed(
                    f"not a DICOM file (no DICM preamble, and no readable dataset: {type(exc).__name__})"
                ) from exc
            if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
                raise Failed(
                    "not a DICOM file (no DICM preamble, and no SOP Class/Instance UID when read as a bare dataset)"
                ) from None
    # The reader turns a file that ends inside an element of undefined length (encapsulated
    # pixels, a sequence) into a warning and keeps what it read: that is a truncated file.
    if any(str(w.message).startswith("End of file reached") for w in caught):
        raise Failed("truncated file: it ends inside an element before the delimiter that closes it")
    return ds


def _check_inflated_size(path: Path, max_bytes: int) -> None:
    """A deflated dataset is inflated whole by the reader: measure it first, a MiB at a time, so a
    deflate bomb is refused with its memory bounded."""
    with open(path, "rb") as fh:
        try:
            read_preamble(fh, False)
            meta = _read_file_meta_info(fh)
        except Exception:  # not Part 10: the reader judges it; nothing is inflated
            return
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
        if syntax not in DEFLATED_SYNTAXES:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := fh.read(1 << 20):
            while chunk:
                total += len(inflater.decompress(chunk, 1 << 20))
                if total > max_bytes:
                    raise Refused(
                        f"the deflated dataset inflates to more than the {max_bytes / 2**20:.0f} MiB cap "
                        "(--max-mb): refused unread (a deflate bomb, or an image too large for this cap)"
                    )
                chunk = inflater.unconsumed_tail


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


def _decoded_bytes(ds: Dataset) -> int:
    """The size the header declares for the decoded pixels (0 when it declares none)."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 0) or 0) * int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        return 0
    return (max(0, bits * frames * samples) + 7) // 8


def _check_pixel_data(ds: Dataset) -> None:
    """Pixel Data that is not whole would be copied damaged: say so instead.

    Native data must be as long as Rows x Columns x bits x frames declare; encapsulated data must
    be a clean run of fragments; the transfer syntax must be one that says which.

    A Pixel Data element that is present but empty reads as ``None``; it is checked as zero
    bytes, not skipped (a fuzzed file with an emptied element was once passed as de-identified).
    """
    if "PixelData" not in ds:
        return
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if missing:  # Type 1 in the Image Pixel module: without them nobody can tell the pixels are whole
        raise Failed(f"Pixel Data without {', '.join(missing)}: the image cannot be checked to be whole")
    data = ds["PixelData"].value or b""
    meta = getattr(ds, "file_meta", None)
    stored = meta.get("TransferSyntaxUID") if meta is not None else None
    syntax = UID(stored) if stored is not None else None
    if syntax is not None and not syntax.is_transfer_syntax:
        raise Failed(f"unknown transfer syntax {syntax}: its pixel data cannot be checked or decoded")
    if syntax is not None and syntax.is_encapsulated:
        if not data:
            raise Failed("empty encapsulated Pixel Data: not even a Basic Offset Table item")
        _check_fragments(bytes(data))
        return
    expected = _decoded_bytes(ds)
    have = len(data)
    if have < expected:
        raise Failed(f"truncated Pixel Data: {have} bytes where {expected} are needed")


def _check_fragments(data: bytes) -> None:
    """Encapsulated Pixel Data is a run of items (FFFE,E000) whose lengths must end exactly where
    the data does; anything else is damage a reader would stumble on, so it is not copied."""
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] != b"\xfe\xff\x00\xe0" or pos + 8 > len(data):
            raise Failed("damaged encapsulated Pixel Data: a fragment does not start with an item tag")
        pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little")
    if pos != len(data):
        raise Failed("damaged encapsulated Pixel Data: the last fragment runs past the end of the data")


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
    """Part 10 bytes with a fresh File Meta Information consistent with the de-identified dataset.

    What ``dcmwrite`` does for a file, without its deep copy of the file meta (a fresh one is
    built here): preamble, prefix, meta, then the dataset in the transfer syntax's encoding (so a
    big-endian source is written little endian in pixel mode).
    """
    syntax = _transfer_syntax(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    fp = DicomBytesIO()
    if syntax.is_transfer_syntax and not syntax.is_private:
        fp.is_implicit_VR, fp.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
        if "PixelData" in ds:  # PS3.5 A.4: encapsulated pixel data has undefined length
            ds["PixelData"].is_undefined_length = syntax.is_compressed
    else:  # a syntax pydicom does not know: the dataset keeps the encoding it was read in
        implicit, little = ds.original_encoding
        fp.is_implicit_VR, fp.is_little_endian = bool(implicit), little is not False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    write_dataset(fp, ds)
    return fp.getvalue()
