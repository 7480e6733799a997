"""Progress that fits where it runs: a bar on a terminal, a few plain lines in a log or CI.

A bar redrawn with carriage returns is unreadable in a log file and invisible until the end in
CI, and a log with nothing in it for minutes looks hung. So :class:`Progress` draws a tqdm bar
only when its stream is a terminal; otherwise it prints ``stage: done/total unit, rate, ETA``
lines at most every ``every`` seconds (``every=0``: one line per step, as for federated rounds).
Messages (per-file errors) go through :meth:`Progress.message`, which clears the bar first so a
message is never glued onto it. The command prints its own one-line summary after :meth:`close`.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

MIB = 1 << 20


def format_mib(nbytes: float) -> str:
    """Bytes as mebibytes, labelled MiB (2**20 bytes), not the decimal MB."""
    return f"{nbytes / MIB:.2f} MiB"


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Count ``total`` steps of one stage; see the module docstring for what is shown where."""

    def __init__(self, total: int, stage: str, unit: str = "file", *, enabled: bool = True,
                 stream: IO[str] | None = None, every: float = 30.0) -> None:
        self.total = total
        self.stage = stage
        self.unit = unit
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done = 0
        self.start = time.monotonic()
        self._last_line = self.start
        self._bar: Any = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, status: str = "") -> None:
        """Count ``n`` more steps; ``status`` (e.g. a round's loss) is shown beside the count."""
        self.done += n
        if self._bar is not None:
            if status:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            if now - self._last_line >= self.every or (self.every == 0 and n):
                self._last_line = now
                print(self.line(status), file=self.stream, flush=True)

    def line(self, status: str = "") -> str:
        """``stage: done/total unit(s), rate, ETA`` (what a log shows instead of a bar)."""
        elapsed = time.monotonic() - self.start
        text = f"{self.stage}: {self.done}/{self.total} {self.unit}{'s' if self.total != 1 else ''}"
        if self.done and elapsed > 0:
            per_step = elapsed / self.done
            rate = f"{1 / per_step:.2f} {self.unit}/s" if per_step < 1 else f"{per_step:.1f} s/{self.unit}"
            text += f", {rate}, elapsed {format_duration(elapsed)}"
            if self.done < self.total:
                text += f", ETA {format_duration(per_step * (self.total - self.done))}"
        return f"{text}; {status}" if status else text

    def message(self, text: str) -> None:
        """Print a line (a per-file error) on its own, never glued onto the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
