"""Whole command-line runs of several tools on the same folders, interleaved in rounds.

The loop the CLI benchmarks share (``dicom_bench.py``, ``deid_cli.py``): every round runs every
command on every input set, alternating the commands' order between rounds so that load from
other jobs on the machine falls on all of them alike; the median round is what counts.
"""

from __future__ import annotations

import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

Command = Callable[[Path, Path], list[str]]  # (input folder, output folder) -> argv
Wall = Callable[[list[str], Path], tuple[float, int]]  # (argv, output folder) -> (seconds, files written)


def fedeid_command(*args: str) -> list[str]:
    """The ``fedeid`` console script as the installed entry point runs it (``fedeid.cli:main``),
    from this checkout."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from fedeid.cli import main; "
            "sys.exit(main())", *args]


def paired_rounds(commands: dict[str, Command], sets: dict[int, Path], rounds: int, scratch: Path,
                  wall: Wall) -> tuple[dict[int, dict[str, list[float]]], dict[int, dict[str, int]]]:
    """Seconds of every round and files written, per set size and command; outputs are removed."""
    seconds: dict[int, dict[str, list[float]]] = {n: {name: [] for name in commands} for n in sets}
    written: dict[int, dict[str, int]] = {n: {} for n in sets}
    for r in range(rounds):
        for n, src in sets.items():
            for k, name in enumerate(list(commands) if r % 2 == 0 else list(reversed(commands))):
                out = scratch / f"{r}-{n}-{k}"
                took, written[n][name] = wall(commands[name](src, out), out)
                seconds[n][name].append(took)
                shutil.rmtree(out, ignore_errors=True)
    return seconds, written


def median_rates(seconds: dict[int, dict[str, list[float]]], written: dict[int, dict[str, int]],
                 unit: str) -> dict[int, dict[str, dict[str, float | int]]]:
    """Per set size and command: the median round's seconds, ``unit``s per second and ``unit``s written."""
    return {
        n: {name: {"seconds": round(statistics.median(v), 3),
                   f"{unit}_per_s": round(n / statistics.median(v), 2),
                   f"{unit}_written": written[n][name]} for name, v in by_cmd.items()}
        for n, by_cmd in seconds.items()
    }


def all_rounds(seconds: dict[int, dict[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    """Every round's seconds, for the JSON."""
    return {str(n): {k: [round(x, 3) for x in v] for k, v in t.items()} for n, t in seconds.items()}
