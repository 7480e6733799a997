"""How long the ``fedeid`` command takes to answer ``--help``, as a user runs it.

Each figure is a whole subprocess run (interpreter start, imports, parsing, printing), repeated
and interleaved so that a busy machine slows every command alike; the median and the minimum
are reported. Peers run in the same loop: the bare interpreter (the floor no command can go
below), ``import torch`` (what every ``--help`` cost when the command modules imported it) and,
with ``--baseline-root``, ``fedeid --help`` from another checkout (e.g. the commit before).

Usage: ``python simulations/benchmarks/cli_startup.py --out reports/cli_startup.json [--repeats 15]
[--baseline-root ../old-checkout]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedeid.io import atomic_write_json  # noqa: E402

TARGET_SECONDS = 0.3
COMMANDS = {
    "python -c pass (floor)": ["-c", "pass"],
    "fedeid --help": ["-m", "fedeid.cli", "--help"],
    "fedeid deid --help": ["-m", "fedeid.cli", "deid", "--help"],
    "fedeid dicom deid --help": ["-m", "fedeid.cli", "dicom", "deid", "--help"],
    "python -c 'import torch' (old --help floor)": ["-c", "import torch"],
}


def time_run(args: list[str], root: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL, env=env, cwd=root)  # -m: cwd first
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("reports/cli_startup.json"))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--baseline-root", type=Path, help="another fedeid checkout to time `fedeid --help` from")
    args = p.parse_args(argv)
    runs = {name: (cmd, ROOT) for name, cmd in COMMANDS.items()}
    if args.baseline_root:
        runs[f"fedeid --help from {args.baseline_root}"] = (COMMANDS["fedeid --help"], args.baseline_root.resolve())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for cmd, root in runs.values():
        time_run(cmd, root)  # warm the file cache once
    for _ in range(args.repeats):
        for name, (cmd, root) in runs.items():
            times[name].append(time_run(cmd, root))
    rows = {name: {"median_s": statistics.median(t), "min_s": min(t), "runs": len(t)} for name, t in times.items()}
    for name, row in rows.items():
        print(f"{name:45s} median {row['median_s']:.3f} s   min {row['min_s']:.3f} s   ({row['runs']} runs)")
    help_median = rows["fedeid --help"]["median_s"]
    verdict = "meets" if help_median < TARGET_SECONDS else "misses"
    print(f"fedeid --help {verdict} the {TARGET_SECONDS} s target (median {help_median:.3f} s)")
    atomic_write_json(args.out, {"target_s": TARGET_SECONDS, "python": platform.python_version(),
                                 "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "commands": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
