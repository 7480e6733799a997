"""DICOM de-identification throughput: fedeid's header profile against dicognito and
dicom-anonymizer on the same files in the same run, and fedeid's full pixel de-identification.

Files: every file pydicom and pydicom-data ship offline that all three header tools process
without error (so each tool does the same work), copied into one folder. Each tool reads every
file from disk, de-identifies it and writes it to disk; rounds alternate the order of the tools so
that load from other jobs on the machine falls on all of them alike, and the median round is
reported. fedeid runs as ``fedeid dicom deid`` does (``DicomDeidentifier.run``: atomic writes with
fsync, manifest), in one process and in one process per CPU (its default); dicognito and
dicom-anonymizer run their per-file API in one process, writing with ``save_as``.

Pixel mode runs the greyscale images of the same corpus through the model (an untrained network
of ``--preset``, default ``test`` at 64 px, unless ``--model`` names a checkpoint, whose modalities
are then used), with one torch thread.

Usage: ``python simulations/benchmarks/dicom_bench.py --out reports/dicom_bench.json [--rounds 7]
[--preset quick | --model CKPT]``
(needs the ``bench`` extra: dicognito, dicom-anonymizer; and pydicom-data).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import torch
from pydicom.data.data_manager import DATA_ROOT, external_data_sources

from fedeid.dicom.pipeline import DicomDeidentifier
from fedeid.dicom.profile import ProfileOptions
from fedeid.dicom.pseudonyms import Keyring
from fedeid.io import atomic_write_json


def corpus(dest: Path) -> list[Path]:
    """Copy the offline test corpus (pydicom's own files and pydicom-data) into ``dest``."""
    roots = [Path(DATA_ROOT) / "test_files"] + [Path(s.data_path) for s in external_data_sources().values()]
    files = []
    for i, root in enumerate(roots):
        for src in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".py"):
            target = dest / str(i) / src.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            files.append(target)
    return files


def fedeid_check(root: Path, out: Path) -> Callable[[Path], bool]:
    runner = DicomDeidentifier(ProfileOptions(), Keyring(os.urandom(32)))
    return lambda path: runner.process(path, path.relative_to(root), out).status == "deidentified"


def dicognito_file(out: Path) -> Callable[[Path], bool]:
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer()

    def run(path: Path) -> bool:
        ds = pydicom.dcmread(path)
        anonymizer.anonymize(ds)
        ds.save_as(out / path.name)
        return True

    return run


def dicom_anonymizer_file(out: Path) -> Callable[[Path], bool]:
    from dicomanonymizer.simpledicomanonymizer import anonymize_dicom_file

    def run(path: Path) -> bool:
        anonymize_dicom_file(str(path), str(out / path.name))
        return True

    return run


def works(tool: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(tool(path))
    except Exception:  # a tool that cannot process a file leaves it out of the common set
        return False


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/dicom_bench.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", help="checkpoint for the pixel-mode figure (default: untrained test preset)")
    parser.add_argument("--preset", default="test", help="untrained network of this preset when no --model")
    parser.add_argument("--level", type=float, default=0.5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        root = tmp_path / "in"
        files = corpus(root)
        checks = {
            "fedeid": fedeid_check(root, tmp_path / "check-fedeid"),
            "dicognito": dicognito_file(_fresh(tmp_path / "check-dicognito")),
            "dicom-anonymizer": dicom_anonymizer_file(_fresh(tmp_path / "check-dicom-anonymizer")),
        }
        common = [p for p in files if all(works(t, p) for t in checks.values())]
        # The common files, flat and uniquely named, as the batch input every tool reads.
        batch = _fresh(tmp_path / "batch")
        for k, path in enumerate(common):
            shutil.copyfile(path, batch / f"{k:04d}.dcm")
        inputs = sorted(batch.iterdir())
        workers = os.cpu_count() or 1
        runner = DicomDeidentifier(ProfileOptions(), Keyring(os.urandom(32)))
        tools: dict[str, Callable[[Path], None]] = {
            "fedeid (1 process)": lambda out: runner.run(batch, out, progress=False, workers=1),
            f"fedeid ({workers} processes)": lambda out: runner.run(batch, out, progress=False, workers=workers),
            "dicognito": lambda out: [dicognito_file(out)(p) for p in inputs],
            "dicom-anonymizer": lambda out: [dicom_anonymizer_file(out)(p) for p in inputs],
        }
        rates: dict[str, list[float]] = {name: [] for name in tools}
        for r in range(args.rounds):
            order = list(tools) if r % 2 == 0 else list(reversed(tools))
            for name in order:
                out = _fresh(tmp_path / "out" / f"{r}-{len(rates[name])}-{name.split()[0]}")
                t0 = time.perf_counter()
                tools[name](out)
                rates[name].append(len(inputs) / (time.perf_counter() - t0))
                shutil.rmtree(out)
        header = {name: statistics.median(v) for name, v in rates.items()}
        best_fedeid = max(v for k, v in header.items() if k.startswith("fedeid"))

        if args.model:
            from fedeid.deid.pipeline import DeIdentifier

            model = DeIdentifier.load(args.model, device="cpu")
        else:
            from fedeid.config import preset
            from fedeid.deid.pipeline import DeIdentifier

            model = DeIdentifier.build(preset(args.preset), device="cpu")
            model.modalities = ("CR", "DX", "CT", "MR", "NM", "OT", "US", "MG", "PT", "XA")
        pixel_runner = DicomDeidentifier(ProfileOptions(), Keyring(os.urandom(32)), model=model, level=args.level)
        pixel_out = tmp_path / "pixel"
        t0 = time.perf_counter()
        records = [pixel_runner.process(p, p.relative_to(root), pixel_out) for p in files]
        pixel_seconds = time.perf_counter() - t0
        done = [r for r in records if r.status == "deidentified"]
        megapixels = 0.0
        for r in done:
            ds = pydicom.dcmread(pixel_out / r.output, stop_before_pixels=True)
            megapixels += int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1) / 1e6

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "header_only": {
            "files": len(common),
            "rounds": args.rounds,
            "files_per_s": {k: round(v, 1) for k, v in header.items()},
            "all_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "fedeid_vs_dicognito": round(best_fedeid / header["dicognito"], 2),
            "fedeid_vs_dicom_anonymizer": round(best_fedeid / header["dicom-anonymizer"], 2),
            "fedeid_1_process_vs_dicognito": round(header["fedeid (1 process)"] / header["dicognito"], 2),
        },
        "pixel": {
            "model": args.model or f"untrained preset('{args.preset}'), {model.image_size} px",
            "level": args.level,
            "files_seen": len(files),
            "files_deidentified": len(done),
            "seconds": round(pixel_seconds, 2),
            "files_per_s_all": round(len(files) / pixel_seconds, 2),
            "deidentified_files_per_s": round(len(done) / pixel_seconds, 2),
            "megapixels_per_s": round(megapixels / pixel_seconds, 2),
        },
    }
    atomic_write_json(args.out, result)
    h = result["header_only"]
    print(f"header-only, {h['files']} files, median of {h['rounds']} rounds ({result['machine']}):")
    for name, v in h["files_per_s"].items():
        print(f"  {name:<22} {v:8.1f} files/s")
    print(
        f"  fedeid (best) / dicognito = {h['fedeid_vs_dicognito']}x (1 process: "
        f"{h['fedeid_1_process_vs_dicognito']}x), fedeid / dicom-anonymizer = {h['fedeid_vs_dicom_anonymizer']}x"
    )
    p = result["pixel"]
    print(
        f"pixel mode ({p['model']}, level {p['level']}): {p['files_deidentified']} of {p['files_seen']} files "
        f"de-identified in {p['seconds']} s = {p['deidentified_files_per_s']} de-identified files/s "
        f"({p['files_per_s_all']} files/s over all, {p['megapixels_per_s']} Mpx/s)"
    )
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
