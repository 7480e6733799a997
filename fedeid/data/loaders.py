"""Real images with patient ids and findings: single files, labelled CSVs, NIH ChestX-ray14.

Every reader turns a file into one grey image, float32 [H, W] in [0, 1], bright = dense:

* **PNG / JPEG / TIFF / BMP** (Pillow): colour is converted to grey (ITU-R 601 luma), alpha and
  palettes dropped; 8-bit values are divided by 255, 16-bit by 65535 (dtype range, so a 16-bit
  PNG written by fedeid reads back exactly); 32-bit integer and float images are min-max scaled.
  Multi-frame files are refused.
* **NPY**: a 2-D numeric array. ``uint8`` / ``uint16`` use their dtype range and ``bool`` is 0/1
  (exact round trips); a float array already within [0, 1] is kept as it is; any other array is
  min-max scaled (a constant one becomes zeros). Non-finite values are refused.
* **DICOM** (pydicom, by ``.dcm``/``.dicom`` suffix or the ``DICM`` preamble): the Modality LUT
  (Rescale Slope/Intercept or a Modality LUT Sequence), then the first VOI window / VOI LUT when
  the file has one, then min-max scaling, then MONOCHROME1 inversion. Colour, multi-frame files
  and files without pixel data are refused.

Any failure raises :class:`fedeid.io.InputError` naming the file and the reason. The batch loaders
(:func:`load_csv`, :func:`load_chestxray14`) never stop at a bad row or image: they return the
images they could load together with an ``InputError`` per problem. :func:`load_dataset` prints
those as ``fedeid: <path>: <reason>`` on stderr and goes on, and raises only when nothing usable
is left.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from fedeid.config import FINDINGS, DataConfig
from fedeid.data.imageset import ImageSet
from fedeid.data.synthetic import generate
from fedeid.imaging import resize_array
from fedeid.io import InputError
from fedeid.progress import Progress

NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NIH_CSV = "Data_Entry_2017.csv"
NO_FINDING = "No Finding"
DICOM_SUFFIXES = {".dcm", ".dicom"}
# Columns of a labels CSV that are not findings: the image, the patient, and the (optional) site.
CSV_PATH, CSV_PATIENT, CSV_SITE, CSV_LABELS = "path", "patient_id", "site", "labels"
_TRUE, _FALSE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", ""}


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """One grey image, float32 [H, W] in [0, 1], from PNG/JPEG/TIFF, NPY or DICOM (module docs)."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file")
    if p.is_dir():
        raise InputError(p, "is a folder, not an image")
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise InputError(p, f"cannot read: {exc.strerror or exc}") from exc
    if not head:
        raise InputError(p, "empty file")
    if p.suffix.lower() == ".npy" or head.startswith(b"\x93NUMPY"):
        img = _read_npy(p)
    elif p.suffix.lower() in DICOM_SUFFIXES or head[128:132] == b"DICM":
        img = _read_dicom(p)
    else:
        img = _read_pillow(p)
    if img.ndim != 2 or min(img.shape) < 1:
        raise InputError(p, f"not a 2-D image (shape {img.shape})")
    return img


def _scale(a: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant image becomes zeros."""
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    return np.zeros(a.shape, np.float32) if hi <= lo else ((a - lo) / (hi - lo)).astype(np.float32)


def _read_npy(p: Path) -> np.ndarray:
    try:
        a = np.load(p, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise InputError(p, "holds Python objects (pickle), not numbers") from exc
        raise InputError(p, f"truncated or corrupt NPY ({exc})") from exc
    except (OSError, EOFError) as exc:
        raise InputError(p, f"truncated or corrupt NPY ({exc})") from exc
    if not isinstance(a, np.ndarray):
        raise InputError(p, "not a single array (an .npz archive?)")
    if a.ndim != 2:
        raise InputError(p, f"{a.ndim}-D array of shape {a.shape}; expected one 2-D grey image")
    if a.size == 0:
        raise InputError(p, "empty array")
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InputError(p, f"array of {a.dtype}, not real numbers")
    if a.dtype in (np.uint8, np.uint16):
        return (a.astype(np.float32) / np.iinfo(a.dtype).max).astype(np.float32)
    if not np.isfinite(a).all():
        raise InputError(p, "array holds NaN or infinite values")
    if np.issubdtype(a.dtype, np.floating) and a.min() >= 0.0 and a.max() <= 1.0:
        return a.astype(np.float32)
    return _scale(a)


def _read_pillow(p: Path) -> np.ndarray:
    try:
        with Image.open(p) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise InputError(p, f"multi-frame image ({im.n_frames} frames); expected one")
            im.load()
            return _pillow_grey(im)
    except UnidentifiedImageError as exc:
        raise InputError(p, "not an image (unknown format)") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(p, f"image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(p, f"truncated or corrupt image ({exc})") from exc


def _pillow_grey(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return (np.asarray(im, dtype=np.float32) / 65535.0).astype(np.float32)
    if im.mode == "I" and im.format == "PNG":  # older Pillow opens 16-bit grey PNG as "I"
        return (np.asarray(im, dtype=np.float32) / 65535.0).astype(np.float32)
    if im.mode in ("I", "F"):
        return _scale(np.asarray(im, dtype=np.float64))
    if im.mode != "L":
        im = im.convert("L")
    return (np.asarray(im, dtype=np.float32) / 255.0).astype(np.float32)


def _read_dicom(p: Path) -> np.ndarray:
    try:
        ds = pydicom.dcmread(p)
    except InvalidDicomError as exc:
        raise InputError(p, "not a DICOM file (no DICM preamble)") from exc
    except Exception as exc:  # a damaged header surfaces as any of EOFError, struct.error, ValueError...
        raise InputError(p, f"truncated or corrupt DICOM ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise InputError(p, "DICOM without pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(p, f"colour DICOM ({photometric}); only MONOCHROME1/2 grey images are supported")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(p, f"multi-frame DICOM ({frames} frames); expected one image")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing decoders and damaged data
        raise InputError(p, f"cannot decode the pixel data ({type(exc).__name__}: {exc})") from exc
    if raw.ndim != 2:
        raise InputError(p, f"pixel data of shape {raw.shape}; expected one 2-D grey image")
    values = apply_modality_lut(raw, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, index=0)
    img = _scale(np.asarray(values))
    return 1.0 - img if photometric == "MONOCHROME1" else img


@dataclass
class _Row:
    path: Path
    patient: int
    labels: np.ndarray
    site: int


def _load_rows(rows: list[_Row], image_size: int, names: tuple[str, ...], desc: str
               ) -> tuple[ImageSet, list[InputError]]:
    """Read and resize every row's image; a failing image becomes an error, not an exception."""
    images, kept, errors = [], [], []
    with Progress(len(rows), desc, "image") as bar:
        for row in rows:
            try:
                images.append(resize_array(read_image(row.path), image_size))
            except InputError as exc:
                errors.append(exc)
            else:
                kept.append(row)
            finally:
                bar.update()
    return ImageSet(
        images=np.stack(images) if images else np.zeros((0, image_size, image_size), np.float32),
        patient_ids=np.array([r.patient for r in kept], dtype=np.int64),
        labels=np.stack([r.labels for r in kept]).astype(np.float32) if kept else np.zeros((0, len(names)), np.float32),
        finding_names=names,
        sites=np.array([r.site for r in kept], dtype=np.int64),
        sources=[str(r.path) for r in kept],
    ), errors


def _check_size(image_size: int) -> int:
    if int(image_size) != image_size or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    return int(image_size)


def _read_table(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV; a file that cannot be a table raises InputError naming it."""
    if not csv_path.is_file():
        raise InputError(csv_path, "no such file" if not csv_path.exists() else "not a file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise InputError(csv_path, "not UTF-8 text") from exc
    except csv.Error as exc:
        raise InputError(csv_path, f"malformed CSV ({exc})") from exc
    if not header:
        raise InputError(csv_path, "empty CSV (no header)")
    if len(set(header)) != len(header):
        raise InputError(csv_path, f"duplicate column names in header {header}")
    return header, rows


def load_csv(csv_path: str | os.PathLike[str], image_size: int, root: str | os.PathLike[str] | None = None
             ) -> tuple[ImageSet, list[InputError]]:
    """Images listed in a labels CSV, resized to ``image_size``; plus one error per bad row/image.

    Columns: ``path`` (relative to ``root``, by default the CSV's folder, or absolute),
    ``patient_id`` (any string; ids are numbered 0, 1, ... in sorted order — numerically when all
    are integers — so the numbering does not depend on row order), an optional integer ``site``
    (0 when absent) and the findings, in one of two forms:

    * a ``labels`` column of ``|``-separated finding names (empty or ``No Finding`` = none); the
      finding names are every name used, sorted; other columns are ignored;
    * otherwise every other column is a finding holding 0/1 (also true/false, yes/no; empty = 0),
      named and ordered by the header.

    A missing, empty or header-less CSV, or one without ``path``/``patient_id``, raises
    :class:`InputError` naming the CSV.
    """
    image_size = _check_size(image_size)
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    header, table = _read_table(csv_path)
    missing = [c for c in (CSV_PATH, CSV_PATIENT) if c not in header]
    if missing:
        raise InputError(csv_path, f"missing required column(s) {missing}; found {header}")
    if CSV_LABELS in header:
        names = tuple(sorted({n.strip() for r in table for n in (r.get(CSV_LABELS) or "").split("|")}
                             - {"", NO_FINDING}))
    else:
        names = tuple(h for h in header if h not in (CSV_PATH, CSV_PATIENT, CSV_SITE))
    errors: list[InputError] = []
    parsed: list[tuple[Path, str, np.ndarray, int]] = []
    for line, r in enumerate(table, start=2):
        try:
            parsed.append(_parse_csv_row(r, names, base, line, csv_path))
        except InputError as exc:
            errors.append(exc)
    ids = _number_ids([pid for _, pid, _, _ in parsed])
    rows = [_Row(path, ids[pid], lab, site) for path, pid, lab, site in parsed]
    images, bad = _load_rows(rows, image_size, names, desc=csv_path.name)
    return images, errors + bad


def _parse_csv_row(r: dict[str, str | None], names: tuple[str, ...], base: Path, line: int,
                   csv_path: Path) -> tuple[Path, str, np.ndarray, int]:
    def fail(reason: str) -> InputError:
        return InputError(csv_path, f"line {line}: {reason}")

    if None in r or any(v is None for v in r.values()):
        raise fail("wrong number of fields")
    rel, pid = (r[CSV_PATH] or "").strip(), (r[CSV_PATIENT] or "").strip()
    if not rel:
        raise fail("empty path")
    if not pid:
        raise fail("empty patient_id")
    site = 0
    if (r.get(CSV_SITE) or "").strip():
        try:
            site = int(r[CSV_SITE].strip())
        except ValueError:
            raise fail(f"site {r[CSV_SITE]!r} is not an integer") from None
    labels = np.zeros(len(names), np.float32)
    if CSV_LABELS in r:
        for name in (n.strip() for n in (r[CSV_LABELS] or "").split("|")):
            if name and name != NO_FINDING:
                labels[names.index(name)] = 1.0
    else:
        for j, name in enumerate(names):
            cell = (r[name] or "").strip().lower()
            if cell in _TRUE:
                labels[j] = 1.0
            elif cell not in _FALSE:
                raise fail(f"column {name!r}: expected 0 or 1, got {r[name]!r}")
    path = Path(rel)
    return (path if path.is_absolute() else base / path), pid, labels, site


def _number_ids(ids: Iterable[str]) -> dict[str, int]:
    unique = set(ids)
    if all(u.lstrip("-").isdigit() for u in unique):
        order = sorted(unique, key=int)
    else:
        order = sorted(unique)
    return {u: i for i, u in enumerate(order)}


def _nih_images(folder: Path) -> dict[str, Path]:
    """File name -> path over ``images/`` and the archives' ``images_*/images/`` folders."""
    found: dict[str, Path] = {}
    dirs = [folder / "images"] + sorted(d / "images" for d in folder.glob("images_*") if d.is_dir())
    for d in dirs:
        if d.is_dir():
            with os.scandir(d) as it:
                for entry in it:
                    found.setdefault(entry.name, Path(entry.path))
    return found


def load_chestxray14(folder: str | os.PathLike[str], image_size: int, limit: int | None = None
                     ) -> tuple[ImageSet, list[InputError]]:
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` + ``images/`` (or ``images_*/images/``).

    Labels are the 14 NIH findings in :data:`NIH_FINDINGS` order (``No Finding`` = none); patient
    ids are NIH's ``Patient ID``; sites are 0. Rows are taken in the CSV's order (grouped by
    patient), up to ``limit`` images that are present on disk. Images listed but absent (a partial
    download) are summed up in one error rather than one per file.
    """
    image_size = _check_size(image_size)
    folder = Path(folder)
    csv_path = folder / NIH_CSV
    if not folder.is_dir():
        raise InputError(folder, "no such folder")
    if not csv_path.is_file():
        raise InputError(folder, f"no {NIH_CSV}: not a ChestX-ray14 folder")
    header, table = _read_table(csv_path)
    needed = ["Image Index", "Finding Labels", "Patient ID"]
    missing = [c for c in needed if c not in header]
    if missing:
        raise InputError(csv_path, f"missing required column(s) {missing}; found {header}")
    on_disk = _nih_images(folder)
    rows: list[_Row] = []
    errors: list[InputError] = []
    absent = 0
    for line, r in enumerate(table, start=2):
        if limit is not None and len(rows) >= limit:
            break
        name = (r["Image Index"] or "").strip()
        if name not in on_disk:
            absent += 1
            continue
        try:
            patient = int((r["Patient ID"] or "").strip())
        except ValueError:
            errors.append(InputError(csv_path, f"line {line}: Patient ID {r['Patient ID']!r} is not an integer"))
            continue
        labels = np.zeros(len(NIH_FINDINGS), np.float32)
        unknown = []
        for label in (x.strip() for x in (r["Finding Labels"] or "").split("|")):
            if label in NIH_FINDINGS:
                labels[NIH_FINDINGS.index(label)] = 1.0
            elif label not in ("", NO_FINDING):
                unknown.append(label)
        if unknown:
            errors.append(InputError(csv_path, f"line {line}: unknown finding(s) {unknown}"))
            continue
        rows.append(_Row(on_disk[name], patient, labels, 0))
    if absent:
        errors.append(InputError(folder, f"{absent} image(s) listed in {NIH_CSV} are not in images/ or "
                                         "images_*/images/ (partial download?); loaded the others"))
    images, bad = _load_rows(rows, image_size, NIH_FINDINGS, desc="ChestX-ray14")
    return images, errors + bad


def load_dataset(cfg: DataConfig) -> tuple[list[ImageSet], ImageSet]:
    """The configured data as ``(sites, test)``.

    ``cfg.source`` is ``"synthetic"`` (:func:`fedeid.data.synthetic.generate`), a labels CSV
    (:func:`load_csv`), a folder holding ``labels.csv`` (what ``fedeid generate`` writes) or a
    ChestX-ray14 folder (:func:`load_chestxray14`). Real data is split by patient with ``cfg.seed``:
    ``cfg.test_patients`` held-out patients (``sites`` = -1) and the rest dealt into ``cfg.n_sites``
    sites of near-equal patient counts; a CSV's own ``site`` column is not used for this split.
    Loading problems are printed to stderr as ``fedeid: <path>: <reason>``.

    ``cfg.findings`` ties the data to the models: when empty it is set to the data's finding names
    (left empty for the synthetic benchmark, where empty means :data:`fedeid.config.FINDINGS`);
    when set (a checkpoint's config, say) the label columns are selected and ordered to match it.
    """
    source = str(cfg.source)
    if source == "synthetic":
        sites, test = generate(cfg)
        if cfg.findings and tuple(cfg.findings) != FINDINGS:
            sites = [_select_findings(s, cfg.findings, source) for s in sites]
            test = _select_findings(test, cfg.findings, source)
        return sites, test
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".csv":
        data, errors = load_csv(path, cfg.image_size)
    elif path.is_dir() and (path / NIH_CSV).is_file():
        data, errors = load_chestxray14(path, cfg.image_size)
    elif path.is_dir() and (path / "labels.csv").is_file():
        data, errors = load_csv(path / "labels.csv", cfg.image_size)
    else:
        raise InputError(path, "data.source must be 'synthetic', a .csv file, or a folder with "
                               f"{NIH_CSV} (ChestX-ray14) or labels.csv")
    for exc in errors:
        print(f"fedeid: {exc}", file=sys.stderr)
    if len(data) == 0:
        raise InputError(path, "no usable images")
    if cfg.findings:
        data = _select_findings(data, cfg.findings, source)
    else:
        cfg.findings = data.finding_names
    return _split_patients(data, cfg, source)


def _select_findings(data: ImageSet, names: Iterable[str], source: str) -> ImageSet:
    names = tuple(names)
    missing = [n for n in names if n not in data.finding_names]
    if missing:
        raise InputError(source, f"data.findings names {missing}, which the data does not have "
                                 f"(it has {list(data.finding_names)})")
    cols = [data.finding_names.index(n) for n in names]
    return ImageSet(data.images, data.patient_ids, data.labels[:, cols], names, data.sites, data.sources)


def _split_patients(data: ImageSet, cfg: DataConfig, source: str) -> tuple[list[ImageSet], ImageSet]:
    """Held-out test patients, then the rest dealt into sites; deterministic from ``cfg.seed``."""
    patients = np.unique(data.patient_ids)
    need = cfg.test_patients + cfg.n_sites
    if len(patients) < need:
        raise InputError(source, f"{len(patients)} patient(s) loaded; need at least data.test_patients + "
                                 f"data.n_sites = {need}")
    order = np.random.default_rng([int(cfg.seed) % 2**63, 0x5EED]).permutation(patients)
    test_ids, rest = order[:cfg.test_patients], order[cfg.test_patients:]
    test = data.subset(np.flatnonzero(np.isin(data.patient_ids, test_ids)))
    test.sites[:] = -1
    sites = []
    for s, ids in enumerate(np.array_split(rest, cfg.n_sites)):
        part = data.subset(np.flatnonzero(np.isin(data.patient_ids, ids)))
        part.sites[:] = s
        sites.append(part)
    return sites, test
