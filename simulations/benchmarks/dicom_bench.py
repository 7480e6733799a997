"""DICOM de-identification throughput: whole ``fedeid dicom deid`` runs against whole runs of the
dicognito and dicom-anonymizer command lines on the same files in the same run, and fedeid's full
pixel de-identification.

Files: every file pydicom and pydicom-data ship offline that all three header tools process
without error (so each tool does the same work). Sets of 1, the common files (~210) and five times
them (~1,050, each copy a distinct SOP instance) are each given to each tool's command line as one
folder: the figure is files / wall time of the whole command (interpreter start, imports, reading,
de-identifying, writing), as a site would run it. Rounds alternate the order of the tools so that
load from other jobs on the machine falls on all of them alike; the median round is reported.
fedeid runs with its defaults (one process per CPU, atomic writes with fsync, manifest journal).

Pixel mode runs the greyscale images of the same corpus through the model (an untrained network
of ``--preset``, default ``test`` at 64 px, unless ``--model`` names a checkpoint, whose modalities
are then used), with one torch thread, in this process.

Usage: ``python simulations/benchmarks/dicom_bench.py --out reports/dicom_bench.json [--rounds 3]
[--preset quick | --model CKPT] [--no-pixel]``
(needs the ``bench`` extra: dicognito, dicom-anonymizer; and pydicom-data).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import torch
from pydicom.data.data_manager import DATA_ROOT, external_data_sources
from pydicom.uid import generate_uid

from fedeid.dicom.pipeline import DicomDeidentifier
from fedeid.dicom.profile import ProfileOptions
from fedeid.dicom.pseudonyms import Keyring
from fedeid.io import atomic_write_json
from paired_runs import Command, all_rounds, fedeid_command, median_rates, paired_rounds


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


def _copies(common: list[Path], dest: Path, times: int) -> Path:
    """``times`` copies of every common file in one flat folder; each copy after the first is a
    distinct SOP instance (new SOP Instance UID), so no tool can treat copies as repeats."""
    dest.mkdir(parents=True)
    for k, path in enumerate(common):
        shutil.copyfile(path, dest / f"{k:04d}-0.dcm")
        if times > 1:
            ds = pydicom.dcmread(path)
            for c in range(1, times):
                ds.SOPInstanceUID = generate_uid()
                if "MediaStorageSOPInstanceUID" in ds.file_meta:
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(dest / f"{k:04d}-{c}.dcm")
    return dest


def _commands(secret: Path) -> dict[str, Command]:
    py = sys.executable
    return {
        "fedeid": lambda src, out: fedeid_command("dicom", "deid", str(src), str(out), "--secret-file", str(secret),
                                                  "--no-progress"),
        "dicognito": lambda src, out: [py, "-m", "dicognito", "--quiet", "-o", str(out), str(src)],
        "dicom-anonymizer": lambda src, out: [str(Path(py).parent / "dicom-anonymizer"), str(src), str(out)],
    }


def _wall(cmd: list[str], out: Path) -> tuple[float, int]:
    """Seconds of one whole command, and how many DICOM files it wrote (a tool that silently
    writes nothing must not look fast)."""
    out.mkdir(parents=True)  # dicom-anonymizer writes nothing into a folder that does not exist
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    seconds = time.perf_counter() - t0
    if r.returncode not in (0, 1):  # 1: fedeid's "some file refused" (Burned In Annotation YES)
        raise RuntimeError(f"{cmd[0]} exited {r.returncode}: {r.stderr[-500:]}")
    return seconds, sum(1 for p in out.rglob("*") if p.is_file() and p.suffix != ".jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/dicom_bench.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", help="checkpoint for the pixel-mode figure (default: untrained test preset)")
    parser.add_argument("--preset", default="test", help="untrained network of this preset when no --model")
    parser.add_argument("--level", type=float, default=0.5)
    parser.add_argument("--no-pixel", action="store_true", help="header-only figures only")
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
        sets = {
            1: _copies(common[:1], tmp_path / "set-1", 1),
            len(common): _copies(common, tmp_path / f"set-{len(common)}", 1),
            5 * len(common): _copies(common, tmp_path / f"set-{5 * len(common)}", 5),
        }
        secret = tmp_path / "site.key"
        secret.write_text(os.urandom(32).hex())
        seconds, written = paired_rounds(_commands(secret), sets, args.rounds, tmp_path / "out", _wall)
        header = median_rates(seconds, written, "files")
        pixel = None if args.no_pixel else _pixel(args, root, files, tmp_path)

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "header_only_cli": {
            "rounds": args.rounds,
            "common_files": len(common),
            "by_files": {str(n): v for n, v in header.items()},
            "all_rounds_seconds": all_rounds(seconds),
            "fedeid_vs_dicognito": {str(n): round(v["fedeid"]["files_per_s"] / v["dicognito"]["files_per_s"], 2)
                                    for n, v in header.items()},
            "fedeid_vs_dicom_anonymizer": {
                str(n): round(v["fedeid"]["files_per_s"] / v["dicom-anonymizer"]["files_per_s"], 2)
                for n, v in header.items()
            },
        },
        "pixel": pixel,
    }
    atomic_write_json(args.out, result)
    h = result["header_only_cli"]
    print(f"header-only, whole command-line runs, median of {h['rounds']} rounds ({result['machine']}):")
    for n, by_tool in header.items():
        cells = ", ".join(
            f"{k} {v['files_per_s']:.1f} files/s ({v['seconds']:.2f} s, {v['files_written']} written)"
            for k, v in by_tool.items()
        )
        print(f"  {n:>5} files: {cells}; fedeid / dicognito = {h['fedeid_vs_dicognito'][str(n)]}x")
    if pixel:
        print(
            f"pixel mode ({pixel['model']}, level {pixel['level']}): {pixel['files_deidentified']} of "
            f"{pixel['files_seen']} files de-identified in {pixel['seconds']} s = "
            f"{pixel['deidentified_files_per_s']} de-identified files/s ({pixel['megapixels_per_s']} Mpx/s)"
        )
    print(f"written {args.out}")


def _pixel(args: argparse.Namespace, root: Path, files: list[Path], tmp_path: Path) -> dict[str, object]:
    from fedeid.deid.pipeline import DeIdentifier

    if args.model:
        model = DeIdentifier.load(args.model, device="cpu")
    else:
        from fedeid.config import preset

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
    return {
        "model": args.model or f"untrained preset('{args.preset}'), {model.image_size} px",
        "level": args.level,
        "files_seen": len(files),
        "files_deidentified": len(done),
        "seconds": round(pixel_seconds, 2),
        "files_per_s_all": round(len(files) / pixel_seconds, 2),
        "deidentified_files_per_s": round(len(done) / pixel_seconds, 2),
        "megapixels_per_s": round(megapixels / pixel_seconds, 2),
    }


if __name__ == "__main__":
    main()
