"""File conventions shared by every command: clear per-file errors, atomic outputs, safe places.

Bad input raises :class:`InputError`, which names the file and the reason, so a batch can
report it and go on. Outputs are written to a temporary file in the same folder and renamed into
place, so a crash never leaves a half-written file behind and readers never see one; they get the
permissions the user's umask allows, like any other tool's files (secrets ask for ``private``).

:class:`OutputFolder` is where a writing command puts its files. It refuses a folder that is,
holds or lies inside an input, and refuses to replace a file that no fedeid run recorded in the
folder's manifest unless the user said ``--overwrite``: a mistyped path never costs a user data.

Every command exits with one of three codes (``fedeid --help`` says so): :data:`EXIT_OK` when
everything was done, :data:`EXIT_PARTIAL` when some inputs failed or were refused (the rest were
done), :data:`EXIT_USAGE` for a usage error or nothing to do (an empty input folder is an error:
a script must not mistake it for success).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fedeid import __version__

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_CODES_HELP = (
    "exit status: 0 everything was done; 1 some inputs failed or were refused (each is named on "
    "stderr, the rest were done); 2 usage error or nothing to do (e.g. an empty input folder); "
    "130 interrupted (the batch's manifest is written first, so rerunning into the same folder needs no "
    "--overwrite).")

MANIFEST_NAME = "fedeid-manifest.json"


class InputError(Exception):
    """An input file that cannot be used; ``str()`` reads ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def batch_exit_code(done: int, failed: int) -> int:
    """The exit status of a batch: 1 if any input failed or was refused, 2 if there was nothing to do."""
    if failed:
        return EXIT_PARTIAL
    return EXIT_OK if done else EXIT_USAGE


def _umask() -> int:
    """The process umask, read without setting it (``os.umask`` would briefly change it for
    every thread, and another thread's file could be created world-writable meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # no /proc (macOS): the narrowest race, and never a wider mode meanwhile
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *, private: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success.

    The file gets mode ``0o666 & ~umask`` (what ``open`` would give it), or ``0o600`` from its
    creation on when ``private`` (keys, secrets: never readable by others, not even briefly).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, private: bool = False) -> None:
    with atomic_open(path, "wb", private=private) as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)
        fh.write("\n")


def atomic_save(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], None]) -> None:
    """Atomically write whatever ``writer(fh)`` writes (``torch.save``, ``savefig``, ``Dataset.save_as``)."""
    with atomic_open(path, "wb") as fh:
        writer(fh)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The file's SHA-256 (hex): names a model in a manifest by content, not by a path that may move."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_stamp(path: str | os.PathLike[str]) -> str:
    """Size and modification time: what tells a rerun that an input has not changed since."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_output_location(inputs: Iterable[str | os.PathLike[str]], output: str | os.PathLike[str]) -> None:
    """Refuse an output that is, holds or lies inside an input (symlinks resolved).

    An output holding a single input file includes that file's own folder: the de-identified copy
    would land beside, or onto, the original. An output inside an input folder would be read back
    as input by the next run.
    """
    out = Path(output).resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out == src:
            raise InputError(output, "is the input itself; write outputs elsewhere (inputs are never modified)")
        if out in src.parents:
            raise InputError(output, f"holds the input {item}; write outputs elsewhere (inputs are never modified)")
        if src in out.parents:
            raise InputError(output, f"lies inside the input {item}; write outputs elsewhere (inputs are never modified)")


def check_new_file(path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Refuse a single-file output (a checkpoint) that would replace a file, unless ``overwrite``."""
    target = Path(path)
    if target.is_dir():
        raise InputError(target, "is a folder; give a file name to write")
    if target.exists() and not overwrite:
        raise InputError(target, "exists; refusing to overwrite it (pass --overwrite to replace it)")


class OutputFolder:
    """A command's output folder: checked before any work, recorded in a manifest as it fills.

    A file is written where nothing exists, where an earlier fedeid run recorded it in the
    folder's manifest (so a rerun, or a resumed crashed run, replaces its own outputs), or anywhere
    with ``overwrite``. Two inputs of one run never share an output. The manifest lists this run's
    files with their status and every output fedeid wrote here; it is rewritten atomically every
    ``flush_seconds`` and when the run ends, even by an exception, so a crash leaves it behind.
    """

    def __init__(self, root: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]],
                 command: str, *, overwrite: bool = False, flush_seconds: float = 10.0) -> None:
        self.root = Path(root)
        check_output_location(inputs, self.root)
        self._real_root = self.root.resolve()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(self.root, "exists and is not a folder; give a folder for the outputs")
        nearest = next(p for p in (self.root, *self.root.absolute().parents) if p.exists())
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise InputError(self.root, f"cannot be written ({nearest} is not writable)")
        self.command = command
        self.overwrite = overwrite
        self.flush_seconds = flush_seconds
        self.manifest_path = self.root / MANIFEST_NAME
        self.previous = self._read_manifest()
        outputs = self.previous["outputs"] if "outputs" in self.previous else [
            f.get("output") for f in self.previous.get("files", []) if isinstance(f, dict)]
        self.ours = {o for o in outputs if isinstance(o, str) and o}
        self.written: set[str] = set()
        self.claimed: dict[str, str] = {}
        self.records: list[dict[str, str]] = []
        self.info: dict[str, Any] = {}
        self._done_before: dict[str, dict[str, Any]] = {}
        self._last_flush = time.monotonic()

    def _read_manifest(self) -> dict[str, Any]:
        """The earlier run's manifest ({} if none); one fedeid cannot read is a foreign file."""
        if not self.manifest_path.exists():
            return {}
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("outputs", data.get("files")), list):
                raise ValueError("no list of outputs")
            return data
        except (OSError, ValueError) as exc:
            if self.overwrite:
                return {}
            raise InputError(self.manifest_path, f"is not a fedeid manifest ({exc}); refusing to "
                                                 "overwrite it (pass --overwrite to replace it)") from exc

    def resume(self, info: dict[str, Any]) -> None:
        """Describe this run (``info`` goes into the manifest); when an earlier run here had the
        same ``info``, :meth:`unchanged` lets its finished, still-present outputs stand."""
        self.info = info
        if all(self.previous.get(k) == v for k, v in info.items()) and self.previous.get("command") == self.command:
            self._done_before = {r["input"]: r for r in self.previous.get("files", [])
                                 if isinstance(r, dict) and r.get("stamp") and isinstance(r.get("input"), str)}

    def unchanged(self, source: str, rel: str | os.PathLike[str], stamp: str) -> bool:
        """True (and recorded) when the earlier run of the same settings already wrote ``rel``
        from this very input (same ``stamp``, e.g. size and modification time) and it is still there."""
        key = Path(rel).as_posix()
        before = self._done_before.get(source)
        if before is None or before.get("output") != key or before.get("stamp") != stamp:
            return False
        if not (self.root / key).is_file() or key in self.claimed:
            return False
        self.claim(key, source)
        self.record(source, key, str(before["status"]), "unchanged since the last run", stamp=stamp)
        return True

    def claim(self, rel: str | os.PathLike[str], source: str = "") -> Path:
        """The path to write ``rel`` to, or InputError naming why this input may not be written there."""
        key = Path(rel).as_posix()
        target = self.root / key
        subject, its = (source, f"its output {target}") if source else (str(target), "the output")

        def refuse(reason: str) -> InputError:
            return InputError(subject, f"{its} {reason}")

        if key in self.claimed:
            raise refuse(f"is also the output of {self.claimed[key]}; rename one of them")
        if key == MANIFEST_NAME:
            raise refuse("would replace the run's manifest")
        if (target.exists() or target.is_symlink()) and key not in self.ours and not self.overwrite:
            if target.is_dir():
                raise refuse("is an existing folder")
            raise refuse("exists and was not written by fedeid; refusing to overwrite it "
                         "(pass --overwrite to replace it)")
        real = target.parent.resolve()
        if real != self._real_root and self._real_root not in real.parents:
            raise refuse(f"would leave {self.root} through a symbolic link; refusing to write there")
        self.claimed[key] = source or key
        return target

    def record(self, source: str, rel: str | os.PathLike[str] | None, status: str, reason: str = "",
               stamp: str = "") -> None:
        """Note one input's outcome (``rel`` is its written output, None when nothing was written;
        ``stamp`` identifies the input's version, so a rerun can tell it is unchanged)."""
        out = Path(rel).as_posix() if rel is not None else ""
        if out:
            self.written.add(out)
        self.records.append({"input": source, "output": out, "status": status, "reason": reason, "stamp": stamp})
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.save()

    def save(self) -> None:
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        still_there = {o for o in self.ours if (self.root / o).exists()}
        atomic_write_json(self.manifest_path, {
            "fedeid_version": __version__,
            "command": self.command,
            **self.info,
            "counts": counts,
            "files": self.records,
            "outputs": sorted(still_there | self.written),
        })
        self._last_flush = time.monotonic()

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.records or self.written:
            self.save()


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
