"""Keyed, repeatable replacements: UIDs, patient pseudonyms, per-patient date shifts.

Every replacement is an HMAC-SHA256 of the original value under a site secret. The same
secret gives the same replacement in every run, so a study de-identified today and its follow-up
de-identified next month still share Study/Series/Frame-of-Reference UIDs and a PatientID,
while nobody without the secret can recompute or invert the mapping. The secret never enters an
output file or the manifest; only a fingerprint of it (a keyed hash of a constant) does, so two
runs can be checked for having used the same key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import uuid
from datetime import date, timedelta
from pathlib import Path

from fedeid.io import InputError, atomic_write_bytes

SECRET_BYTES = 32
# Modified dates move into the past by 1 .. MAX_SHIFT_DAYS days: far enough that a shifted date
# does not reveal the real one, close enough that seasons and ages stay plausible.
MAX_SHIFT_DAYS = 3 * 365


def new_secret_file(path: str | os.PathLike[str]) -> None:
    """Write a fresh random site secret (hex), readable by its owner only."""
    target = Path(path)
    if target.exists():
        raise InputError(target, "exists; refusing to overwrite a site secret (every mapping depends on it)")
    # private from creation: written with the umask's mode and chmod-ed after, the secret would be
    # world-readable for a moment
    atomic_write_bytes(target, secrets.token_hex(SECRET_BYTES).encode() + b"\n", private=True)


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a secret written by :func:`new_secret_file` (or any file of at least 16 bytes)."""
    p = Path(path)
    try:
        raw = p.read_bytes().strip()
    except OSError as exc:
        raise InputError(p, f"cannot read the site secret: {exc.strerror or exc}") from exc
    try:
        key = bytes.fromhex(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) < 16:
        raise InputError(p, "site secret is shorter than 16 bytes; create one with `fedeid dicom keygen`")
    return key


class Keyring:
    """All keyed mappings of one run; caches them, since a series repeats the same UIDs."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("site secret must be at least 16 bytes")
        self._secret = secret
        self._uids: dict[str, str] = {}

    def _mac(self, domain: str, value: str) -> bytes:
        # The domain separates the uses of one key: a UID and a PatientID with equal text map apart.
        # The standard library's HMAC: the same HMAC-SHA256 as any other, without importing a
        # crypto package on the start-up path of every header-only run.
        message = domain.encode() + b"\x00" + value.encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    @property
    def fingerprint(self) -> str:
        """Identifies the key (not the data) in manifests: equal fingerprints, comparable outputs."""
        return self._mac("fingerprint", "fedeid").hex()[:16]

    def uid(self, original: str) -> str:
        """A ``2.25.`` UID (an integer-form UUID, PS3.5 B.2) derived from the original UID."""
        original = original.strip().rstrip("\x00")
        mapped = self._uids.get(original)
        if mapped is None:
            mapped = "2.25." + str(uuid.UUID(bytes=self._mac("uid", original)[:16], version=4).int)
            self._uids[original] = mapped
        return mapped

    def pseudonym(self, original: str) -> str:
        """A PatientID pseudonym: ``FEDEID-`` and 20 base32 characters (100 bits of the HMAC)."""
        token = base64.b32encode(self._mac("patient", original.strip())[:15]).decode("ascii").rstrip("=")
        return f"FEDEID-{token[:20]}"

    def token(self, original: str) -> str:
        """A short keyed token naming what must not be named in clear: an input path in the
        manifest, an output path part that is not a plain UID."""
        return "x" + self._mac("path", original).hex()[:16]

    def date_shift(self, patient_key: str) -> timedelta:
        """The per-patient shift of Retain Longitudinal Temporal Information with Modified Dates."""
        n = int.from_bytes(self._mac("date-shift", patient_key)[:8], "big")
        return timedelta(days=-(1 + n % MAX_SHIFT_DAYS))


def shift_da(value: str, shift: timedelta) -> str:
    """Shift one DA value (``YYYYMMDD``); anything unparseable becomes empty rather than leak."""
    v = value.strip()
    if len(v) != 8 or not v.isdigit():
        return ""
    try:
        d = date(int(v[:4]), int(v[4:6]), int(v[6:8])) + shift
    except (ValueError, OverflowError):
        return ""
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def shift_dt(value: str, shift: timedelta) -> str:
    """Shift the date part of a DT value, keeping time of day, fraction and UTC offset.

    A DT with year only or year+month is shifted at that precision's first day, then truncated
    back, so the precision the source chose is kept.
    """
    v = value.strip()
    head = v[:8]
    if len(head) < 4 or not head.isdigit():
        return ""
    padded = head + "0101"[len(head) - 4 :] if len(head) < 8 else head
    shifted = shift_da(padded, shift)
    if not shifted:
        return ""
    return shifted[: len(head)] + v[len(head) :]
