"""``fedeid audit ...``: site keys, signed checkpoints, countersignatures, verification."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedeid.audit import keys
from fedeid.audit.log import AuditLog, countersign
from fedeid.io import InputError, atomic_write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit", help="the site's tamper-evident audit log: keys, checkpoints, verification",
        description="Every training round, model release and de-identification run appends a hash-chained "
                    "entry to <state>/audit/log.jsonl (<state> = --state-dir, $FEDEID_STATE_DIR or "
                    "~/.fedeid). Checkpoints sign the log's Merkle tree head with the site key.")
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    p = sub.add_parser("keygen", help="create an Ed25519 signing key (KEY, 0600) and KEY.pub")
    p.add_argument("key", type=Path)
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("checkpoint", help="sign the log's current Merkle tree head with the site key")
    _state_arg(p)
    p.add_argument("--key", required=True, type=Path, help="the site's Ed25519 key")
    p.add_argument("--out", type=Path, help="also write the checkpoint here (to send to the coordinator)")
    p.set_defaults(func=_checkpoint)

    p = sub.add_parser("countersign", help="(coordinator) countersign a site checkpoint file")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--key", required=True, type=Path, help="the coordinator's Ed25519 key")
    p.add_argument("--trust", action="append", metavar="PUB|FINGERPRINT",
                   help="the site's public key or fingerprint (required signer; repeatable)")
    p.add_argument("--out", type=Path, help="output file (default: replace CHECKPOINT)")
    p.set_defaults(func=_countersign)

    p = sub.add_parser("verify", help="check the chain and every checkpoint; exit 1 on any tampering")
    _state_arg(p)
    p.add_argument("--checkpoint", action="append", type=Path, default=[], metavar="FILE",
                   help="a checkpoint kept elsewhere, e.g. the coordinator's countersigned copy (repeatable)")
    p.add_argument("--trust", action="append", metavar="PUB|FINGERPRINT",
                   help="accept checkpoints signed only by these keys (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_verify)


def _state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, help="the site's state folder (default $FEDEID_STATE_DIR or ~/.fedeid)")


def trusted(items: list[str] | None) -> list[str] | None:
    """Fingerprints from ``--trust`` values: a fingerprint as is, or a key file's."""
    if not items:
        return None
    return [item if item.startswith("SHA256:") else keys.fingerprint(keys.load_public_key(item)) for item in items]


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable JSON file ({exc})") from exc
    if not isinstance(obj, dict):
        raise InputError(path, "not a JSON object")
    return obj


def _keygen(args: argparse.Namespace) -> int:
    priv, pub = keys.generate_key(args.key, overwrite=args.force)
    print(f"key: {priv} (mode 600)  public: {pub}  fingerprint: {keys.fingerprint(keys.load_public_key(pub))}")
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    cp = AuditLog(args.state_dir).checkpoint(keys.load_private_key(args.key))
    if args.out:
        atomic_write_json(args.out, cp)
    print(f"checkpoint: {cp['size']} entries, root {cp['root']}")
    return 0


def _countersign(args: argparse.Namespace) -> int:
    try:
        out = countersign(_read_json(args.checkpoint), keys.load_private_key(args.key), trusted(args.trust))
    except ValueError as exc:
        raise InputError(args.checkpoint, str(exc)) from exc
    atomic_write_json(args.out or args.checkpoint, out)
    print(f"countersigned checkpoint of {out['size']} entries: {args.out or args.checkpoint}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    log = AuditLog(args.state_dir)
    result = log.verify([_read_json(p) for p in args.checkpoint], trusted(args.trust))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for problem in result["problems"]:
            print(f"fedeid: {log.path}: {problem}", file=sys.stderr)
        state = "OK" if result["ok"] else "TAMPERED"
        print(f"{state}: {result['entries']} entries, {result['checkpoints']} checkpoint(s), "
              f"signed by {', '.join(result['signers']) or 'nobody'}")
    return 0 if result["ok"] else 1
