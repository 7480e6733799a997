"""Pixel de-identification speed as a user meets it: whole ``fedeid deid`` runs on a folder of
images, paired in the same rounds with a classical peer on the same files.

The files are the synthetic benchmark's held-out test radiographs (16-bit PNGs, written by
``fedeid generate``). Sets of 1 image, the test set (120 at the quick preset) and five times it
(distinct files) are each given to every command as one folder; the figure is images / wall time
of the whole command (interpreter start, imports, loading the checkpoint, reading, de-identifying,
writing atomically with the manifest), as a site would run it. Rounds alternate the order of the
commands, so that load from other jobs falls on all of them alike; the median round is reported.

Commands:

* ``fedeid deid --level 0.5`` and ``--level 1`` — the checkpoint of ``--model``, or, by default,
  an untrained network of ``--preset`` (speed does not depend on training); and ``--level 0.5
  --batch-size 1``, one image through the network at a time (what the command did before);
* ``opencv blur`` — the peer: the Gaussian-blur de-identification a site could script instead
  (OpenCV, one ``python -c`` command: read each 16-bit PNG, blur it with the blur baseline's
  sigma, write a 16-bit PNG). It is a floor of reading and writing the same files, not an equal:
  blur keeps the patient identifiable (see the privacy tables).

Usage: ``python simulations/benchmarks/deid_cli.py --out reports/deid_cli.json [--rounds 3]
[--preset quick | --model CKPT]``
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
from pathlib import Path

from paired_runs import ROOT, Command, all_rounds, fedeid_command, median_rates, paired_rounds

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedeid.io import atomic_write_json  # noqa: E402

IMAGE_SUFFIXES = (".png",)
BLUR_SIGMA = 2.0  # pixels at 128 px, the order of the blur baseline's middle level

PEER = f"""
import sys
from pathlib import Path
import cv2
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for p in sorted(src.rglob('*.png')):
    image = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    out = dst / p.relative_to(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.GaussianBlur(image, (0, 0), {BLUR_SIGMA}))
"""


def commands(model: Path) -> dict[str, Command]:
    deid = lambda *opts: lambda src, out: fedeid_command(  # noqa: E731
        "deid", str(src), str(out), "--model", str(model), *opts, "--no-progress")
    return {
        "fedeid deid --level 0.5": deid("--level", "0.5"),
        "fedeid deid --level 1": deid("--level", "1"),
        "fedeid deid --level 0.5 --batch-size 1": deid("--level", "0.5", "--batch-size", "1"),
        "opencv blur (peer)": lambda src, out: [sys.executable, "-c", PEER, str(src), str(out)],
    }


def image_sets(generated: Path, dest: Path) -> dict[int, Path]:
    """1 image, the test set, and five copies of it (distinct files), each its own folder."""
    test = sorted(p for p in (generated / "test").rglob("*") if p.suffix in IMAGE_SUFFIXES)
    if not test:
        raise SystemExit(f"{generated}: fedeid generate wrote no test images")
    sets: dict[int, Path] = {}
    for n, copies in ((1, 1), (len(test), 1), (5 * len(test), 5)):
        folder = dest / f"set-{n}"
        folder.mkdir(parents=True)
        for c in range(copies):
            for k, p in enumerate(test[:n] if copies == 1 else test):
                shutil.copyfile(p, folder / f"{k:04d}-{c}.png")
        sets[n] = folder
    return sets


def wall(cmd: list[str], out: Path) -> tuple[float, int]:
    """Seconds of one whole command and how many images it wrote (writing nothing is not fast)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:1] + cmd[3:5])} exited {r.returncode}: {r.stderr[-800:]}")
    return seconds, sum(1 for p in out.rglob("*.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/deid_cli.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="quick", help="data and (without --model) network preset")
    parser.add_argument("--model", type=Path, help="checkpoint to time (default: untrained network of --preset)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        generated = tmp_path / "generated"
        subprocess.run(fedeid_command("generate", "--preset", args.preset, "--out", str(generated), "--no-progress"),
                       check=True, capture_output=True)
        model = args.model
        if model is None:
            from fedeid.config import preset
            from fedeid.deid.pipeline import DeIdentifier

            model = tmp_path / "untrained.pt"
            DeIdentifier.build(preset(args.preset), device="cpu").save(model)
        sets = image_sets(generated, tmp_path / "in")
        seconds, written = paired_rounds(commands(model), sets, args.rounds, tmp_path / "out", wall)

    peer = "opencv blur (peer)"
    by_files = {str(n): v for n, v in median_rates(seconds, written, "images").items()}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "load_average_at_end": os.getloadavg()[0],
        "python": platform.python_version(),
        "model": str(args.model) if args.model else f"untrained preset('{args.preset}')",
        "rounds": args.rounds,
        "by_files": by_files,
        "all_rounds_seconds": all_rounds(seconds),
        "peer_seconds_over_fedeid_seconds": {
            n: {name: round(v[peer]["seconds"] / v[name]["seconds"], 3) for name in v if name != peer}
            for n, v in by_files.items()
        },
    }
    atomic_write_json(args.out, result)
    print(f"whole command-line runs, median of {args.rounds} rounds ({result['machine']}, "
          f"load {result['load_average_at_end']:.1f}), model: {result['model']}")
    for n, by_cmd in by_files.items():
        cells = "; ".join(f"{k} {v['images_per_s']:.1f} img/s ({v['seconds']:.2f} s, {v['images_written']} written)"
                          for k, v in by_cmd.items())
        print(f"  {n:>4} images: {cells}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
