"""Merkle tree heads and proofs over the audit log, in the style of RFC 6962 / RFC 9162.

A thin facade over ``pymerkle`` (its SHA-256 tree with the RFC's domain separation: leaves are
hashed as ``H(0x00 || entry)``, nodes as ``H(0x01 || left || right)``), so a tree head signed
today commits to every entry before it: an inclusion proof shows one entry is in a signed head
without revealing the others, and a consistency proof shows a later head extends an earlier one
(nothing was rewritten in between). Leaves are the canonical bytes of the log's entries. Indices
here are 0-based like the log's ``seq``; pymerkle's are 1-based.
"""

from __future__ import annotations

from typing import Any

from pymerkle import ConsistencyProof, InclusionProof, InmemoryTree, InvalidProof
from pymerkle import verify_consistency as _verify_consistency
from pymerkle import verify_inclusion as _verify_inclusion

ALGORITHM = "sha256"


def build_tree(leaves: list[bytes]) -> InmemoryTree:
    tree = InmemoryTree(algorithm=ALGORITHM)
    for leaf in leaves:
        tree.append_entry(leaf)
    return tree


def root(tree: InmemoryTree, size: int) -> str:
    """Hex root of the first ``size`` leaves (``size`` >= 1)."""
    if not 1 <= size <= tree.get_size():
        raise ValueError(f"tree head of size {size} asked of a tree of {tree.get_size()} leaves")
    return tree.get_root(size).hex()


def leaf_hash(leaf: bytes) -> bytes:
    """``H(0x00 || leaf)``: the RFC's leaf hash (pymerkle's ``hash_buff`` adds the prefix)."""
    return InmemoryTree(algorithm=ALGORITHM).hash_buff(leaf)


def prove_inclusion(tree: InmemoryTree, index: int, size: int) -> dict[str, Any]:
    """The audit path of leaf ``index`` (0-based) in the head of ``size`` leaves, as plain JSON."""
    return tree.prove_inclusion(index + 1, size).serialize()


def check_inclusion(leaf: bytes, root_hex: str, proof: dict[str, Any]) -> None:
    """Raise ValueError unless ``proof`` places ``leaf`` under ``root_hex``."""
    try:
        _verify_inclusion(leaf_hash(leaf), bytes.fromhex(root_hex), InclusionProof.deserialize(proof))
    except (InvalidProof, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"inclusion proof does not verify: {exc}") from exc


def prove_consistency(tree: InmemoryTree, prior_size: int, later_size: int) -> dict[str, Any]:
    return tree.prove_consistency(prior_size, later_size).serialize()


def check_consistency(prior_root: str, later_root: str, proof: dict[str, Any]) -> None:
    """Raise ValueError unless the later head extends the prior one (append-only in between)."""
    try:
        _verify_consistency(bytes.fromhex(prior_root), bytes.fromhex(later_root), ConsistencyProof.deserialize(proof))
    except (InvalidProof, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"consistency proof does not verify: {exc}") from exc
