"""The site's append-only audit log: hash-chained JSON lines, signed Merkle checkpoints.

::

    <state>/audit/log.jsonl           one entry per line: {"seq", "time", "kind", "data", "prev", "hash"}
    <state>/audit/checkpoints.jsonl   signed tree heads: {"size", "root", "time", "signatures": [...]}
    <state>/audit/input-hash.key      the site's secret for keyed input hashes (0600, made on first use)

``<state>`` is ``$FEDEID_STATE_DIR`` or ``~/.fedeid``. Each entry's ``hash`` is SHA-256 over the
canonical JSON of the entry without it, and ``prev`` is the previous entry's hash, so editing,
removing, reordering or inserting an entry breaks the chain at that point. A chain alone cannot
show that its *tail* was cut off, or that the whole file was rewritten with a fresh chain:
signed checkpoints (a Merkle tree head over the first ``size`` entries, signed with the site's
Ed25519 key and, when sent to the coordinator, countersigned by it) close that gap — ``verify``
fails when the log no longer holds what a checkpoint signed. A checkpoint kept only beside the log
can be deleted with it, which is why the coordinator keeps a countersigned copy.

The log is appended in place (never rewritten through a temporary file: that is what makes it
append-only) under an exclusive ``flock`` held across reading the last hash, writing the line and
``fsync``, so concurrent writers on one host keep one valid chain. ``flock`` does not lock across
NFS clients; keep the state folder on a local disk.

The log holds no PHI by construction: :func:`record` refuses path objects as values, counts
inputs by a keyed hash of their bytes (never their names; keyed, so nobody without the site key
can confirm that a known image was processed), and names models by the SHA-256 of their file.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import hmac
import json
import math
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedeid.audit import keys, merkle
from fedeid.io import InputError

GENESIS = "0" * 64
CHECKPOINT_FORMAT = "fedeid-audit-checkpoint/1"
ENTRY_KEYS = {"seq", "time", "kind", "data", "prev", "hash"}


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The site's state folder: ``explicit``, else ``$FEDEID_STATE_DIR``, else ``~/.fedeid``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("FEDEID_STATE_DIR")
    return Path(env) if env else Path.home() / ".fedeid"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(keys.canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from exc


def checkpoint_message(cp: dict[str, Any]) -> bytes:
    """What a checkpoint's signatures cover: its format, size, root and time."""
    return keys.canonical({"format": CHECKPOINT_FORMAT, "size": cp["size"], "root": cp["root"], "time": cp["time"]})


class AuditLog:
    def __init__(self, state: str | os.PathLike[str] | None = None) -> None:
        self.root = state_dir(state) / "audit"
        self.path = self.root / "log.jsonl"
        self.checkpoints_path = self.root / "checkpoints.jsonl"
        self._lock_path = self.root / ".lock"
        self._key_path = self.root / "input-hash.key"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive across processes; an unwritable state folder is a clear error, not a traceback."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = open(self._lock_path, "a")
        except OSError as exc:
            raise InputError(self.root, f"cannot write the audit log ({exc.strerror or exc}); "
                                        "set --state-dir or $FEDEID_STATE_DIR") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- writing ------------------------------------------------------------------------------
    def append(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """Append one entry (chained to the last) and return it."""
        data = plain(data, kind)
        with self._locked():
            last = _last_line(self.path)
            prev, seq = GENESIS, 0
            if last:
                try:
                    tail = json.loads(last)
                    prev, seq = tail["hash"], int(tail["seq"]) + 1
                except (ValueError, KeyError, TypeError) as exc:
                    raise InputError(self.path, "last entry is unreadable; run `fedeid audit verify`") from exc
            entry = {"seq": seq, "time": _now(), "kind": kind, "data": data, "prev": prev}
            entry["hash"] = entry_hash(entry)
            line = keys.canonical(entry) + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return entry

    def checkpoint(self, key: keys.Ed25519PrivateKey) -> dict[str, Any]:
        """Sign the tree head of the whole log with the site key and append it to the checkpoints."""
        with self._locked():
            entries = self.entries()
            if not entries:
                raise InputError(self.path, "the audit log is empty: nothing to checkpoint")
            broken = chain_problems(entries)
            if broken:  # signing a broken chain would vouch for the tampering
                raise InputError(self.path, f"refusing to checkpoint a broken chain: {broken[0]}")
            tree = merkle.build_tree([keys.canonical(e) for e in entries])
            cp: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "size": len(entries),
                                  "root": merkle.root(tree, len(entries)), "time": _now()}
            cp["signatures"] = [{"role": "site", **keys.sign(key, checkpoint_message(cp))}]
            with open(self.checkpoints_path, "ab") as fh:
                fh.write(keys.canonical(cp) + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
        return cp

    def input_digest(self, paths: Iterable[Path]) -> dict[str, Any]:
        """``{"count", "digest"}`` of input files by HMAC-SHA256 of their bytes under the site key."""
        with self._locked():
            if not self._key_path.exists():
                fd = os.open(self._key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(secrets.token_bytes(32))
        secret = self._key_path.read_bytes()
        digests = []
        for p in paths:
            mac = hmac.new(secret, digestmod="sha256")
            try:
                with open(p, "rb") as fh:
                    for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        mac.update(chunk)
            except OSError:
                continue  # unreadable inputs are the run's failures, reported by the run itself
            digests.append(mac.hexdigest())
        return {"count": len(digests), "digest": hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()}

    # -- reading ------------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every entry, parsed; an unparsable line raises InputError naming its line number."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    entry = json.loads(line)
                    if not isinstance(entry, dict):
                        raise ValueError("not an object")
                except ValueError as exc:
                    raise InputError(self.path, f"line {n}: not a JSON entry ({exc})") from exc
                out.append(entry)
        return out

    def checkpoints(self) -> list[dict[str, Any]]:
        if not self.checkpoints_path.exists():
            return []
        try:
            return [json.loads(line) for line in self.checkpoints_path.read_bytes().splitlines() if line.strip()]
        except ValueError as exc:
            raise InputError(self.checkpoints_path, f"not JSON lines ({exc})") from exc

    def verify(self, extra_checkpoints: list[dict[str, Any]] | None = None,
               trusted: list[str] | None = None) -> dict[str, Any]:
        """Check the chain and every checkpoint; ``problems`` lists each break with its entry number."""
        problems: list[str] = []
        try:
            entries = self.entries()
        except InputError as exc:
            return {"ok": False, "entries": 0, "checkpoints": 0, "problems": [exc.reason], "head": None,
                    "signers": []}
        problems += chain_problems(entries)
        cps = self.checkpoints() + list(extra_checkpoints or [])
        tree = merkle.build_tree([keys.canonical(e) for e in entries]) if entries else None
        signers: set[str] = set()
        for j, cp in enumerate(cps):
            try:
                size, cp_root = int(cp["size"]), str(cp["root"])
                sigs = cp["signatures"]
                for sig in sigs:
                    signers.add(keys.verify(sig, checkpoint_message(cp), trusted))
                if not sigs:
                    raise ValueError("no signature")
            except (KeyError, TypeError, ValueError) as exc:
                problems.append(f"checkpoint {j}: invalid ({exc})")
                continue
            if size > len(entries):
                problems.append(f"checkpoint {j}: signed {size} entries but the log holds {len(entries)} (truncated)")
            elif tree is None or merkle.root(tree, size) != cp_root:
                problems.append(f"checkpoint {j}: the first {size} entries are not those it signed (rewritten)")
        return {"ok": not problems, "entries": len(entries), "checkpoints": len(cps), "problems": problems,
                "head": entries[-1]["hash"] if entries else None, "signers": sorted(signers)}

    def inclusion(self, seq: int, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Inclusion proof of entry ``seq`` in a checkpoint's tree head."""
        entries = self.entries()
        tree = merkle.build_tree([keys.canonical(e) for e in entries[: int(checkpoint["size"])]])
        return merkle.prove_inclusion(tree, seq, int(checkpoint["size"]))


def chain_problems(entries: list[dict[str, Any]]) -> list[str]:
    """Every break of the hash chain, by entry number."""
    problems: list[str] = []
    prev = GENESIS
    for i, e in enumerate(entries):
        if set(e) != ENTRY_KEYS:
            problems.append(f"entry {i}: fields {sorted(e)} are not those of an audit entry")
        if e.get("seq") != i:
            problems.append(f"entry {i}: sequence number {e.get('seq')!r} (entries removed, inserted or reordered)")
        if e.get("prev") != prev:
            problems.append(f"entry {i}: does not chain to entry {i - 1} (entries removed, inserted or reordered)")
        if e.get("hash") != entry_hash(e):
            problems.append(f"entry {i}: content does not match its hash (edited)")
        prev = e.get("hash", "")
    return problems


def countersign(cp: dict[str, Any], key: keys.Ed25519PrivateKey, trusted_site: list[str] | None = None
                ) -> dict[str, Any]:
    """The coordinator's countersignature on a site checkpoint, after checking the site's own."""
    site = [s for s in cp.get("signatures", []) if s.get("role") == "site"]
    if not site:
        raise ValueError("checkpoint carries no site signature")
    keys.verify(site[0], checkpoint_message(cp), trusted_site)
    out = dict(cp)
    out["signatures"] = [*cp["signatures"], {"role": "coordinator", **keys.sign(key, checkpoint_message(cp))}]
    return out


def record(kind: str, *, inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
           model: str | os.PathLike[str] | None = None, state: str | os.PathLike[str] | None = None,
           **fields: Any) -> dict[str, Any]:
    """Append one event to the site's audit log: the one call a command makes.

    ``inputs`` (a file, a folder — every file under it — or several) are counted by keyed hash;
    ``model`` (a checkpoint file) is named by its SHA-256; ``fields`` must be plain data without
    file names (path objects are refused).
    """
    log = AuditLog(state)
    data = dict(fields)
    if inputs is not None:
        data["inputs"] = log.input_digest(_files(inputs))
    if model is not None:
        data["model_sha256"] = file_sha256(model)
    return log.append(kind, data)


def _files(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out: list[Path] = []
    for item in map(Path, items):
        out.extend(sorted(p for p in item.rglob("*") if p.is_file() and not p.is_symlink()) if item.is_dir() else [item])
    return out


def plain(obj: Any, where: str) -> Any:
    """Entry data as plain JSON: no file paths (the log never names a file), no NaN/inf, no numpy.

    Non-finite floats become the strings ``"inf"``/``"nan"`` (an ε of infinity is a fact worth
    recording, and canonical JSON has no spelling for it); numpy scalars their Python value.
    """
    if isinstance(obj, os.PathLike):
        raise TypeError(f"audit entry {where!r}: file paths are not recorded (got {type(obj).__name__})")
    if isinstance(obj, dict):
        return {str(k): plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, where) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # a numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _last_line(path: Path) -> bytes:
    """The last non-empty line of ``path`` (b"" if none), read backwards from the end."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return b""
    with fh:
        end = fh.seek(0, os.SEEK_END)
        buf, pos = b"", end
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            lines = buf.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or pos == 0:
                return lines[-1]
    return b""
