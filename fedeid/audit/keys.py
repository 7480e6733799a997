"""Ed25519 signing keys of a site (and of the coordinator) for audit checkpoints and reports.

The federation's transport keys (:mod:`fedeid.privacy.certs`) are P-384 because Flower refuses
Ed25519 for SuperNodes; signatures over documents have no such constraint, and Ed25519's
deterministic signatures leave no nonce to get wrong. A key is a PKCS#8 PEM file (mode 0600)
beside its public half, ``<key>.pub`` (SubjectPublicKeyInfo PEM). A signature alone only shows
that *some* key signed: a verifier pins the signer by comparing the fingerprint with one it got
out of band (``--trust``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedeid.io import InputError, atomic_write_bytes


def canonical(obj: Any) -> bytes:
    """The one byte form that is hashed and signed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def generate_key(path: str | os.PathLike[str], overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key to ``path`` (0600) and its public half to ``path.pub``."""
    priv = Path(path)
    pub = priv.with_name(priv.name + ".pub")
    if not overwrite and (priv.exists() or pub.exists()):
        raise InputError(priv if priv.exists() else pub, "already exists (use --force to replace it)")
    key = Ed25519PrivateKey.generate()
    atomic_write_bytes(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    os.chmod(priv, 0o600)
    atomic_write_bytes(pub, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise InputError(path, f"cannot read key: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        raise InputError(path, f"not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(path, f"not an Ed25519 key ({type(key).__name__}); create one with `fedeid audit keygen`")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """A public key file, or the public half of a private key file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read key: {exc.strerror or exc}") from exc
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        key = load_private_key(path).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(path, f"not an Ed25519 key ({type(key).__name__})")
    return key


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """``SHA256:`` + hex of the raw public key's hash: what an officer compares by phone."""
    return "SHA256:" + hashlib.sha256(raw_public(key)).hexdigest()


def sign(key: Ed25519PrivateKey, message: bytes) -> dict[str, str]:
    """A detached signature record: algorithm, signer's public key and fingerprint, signature."""
    pub = key.public_key()
    return {"algorithm": "Ed25519", "public_key": base64.b64encode(raw_public(pub)).decode(),
            "fingerprint": fingerprint(pub), "signature": base64.b64encode(key.sign(message)).decode()}


def verify(record: dict[str, Any], message: bytes, trusted: list[str] | None = None) -> str:
    """Check a :func:`sign` record over ``message``; returns the signer's fingerprint.

    Raises ValueError when the signature does not verify, or when ``trusted`` fingerprints are
    given and the signer is none of them.
    """
    try:
        if record.get("algorithm") != "Ed25519":
            raise ValueError(f"unsupported signature algorithm {record.get('algorithm')!r}")
        pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(record["public_key"], validate=True))
        pub.verify(base64.b64decode(record["signature"], validate=True), message)
    except (InvalidSignature, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad signature ({type(exc).__name__}: {exc})" if str(exc) else "bad signature") from exc
    fp = fingerprint(pub)
    if record.get("fingerprint") not in (None, fp):
        raise ValueError("signature record names another key's fingerprint")
    if trusted is not None and fp not in trusted:
        raise ValueError(f"signed by {fp}, which is not a trusted key")
    return fp
