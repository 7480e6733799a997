"""The ``fedeid`` command.

Each subcommand lives beside the code it drives and registers itself here through a
``register(subparsers)`` function, so this file stays an index. Every command exits 2 with
``fedeid: <file>: <reason>`` on bad input and 0 on success; batch commands report per-file
failures and go on with the rest.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fedeid import __version__
from fedeid.io import InputError

# Modules that provide ``register(subparsers)``, in the order ``fedeid --help`` lists them.
COMMAND_MODULES = (
    "fedeid.data.commands",
    "fedeid.commands",
    "fedeid.deid.commands",
    "fedeid.dicom.commands",
    "fedeid.federated.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedeid",
        description=(
            "Federated, adjustable de-identification of medical images. Identity-relevant "
            "regions (found by a re-identification network) are blocked at a privacy level in "
            "[0, 1] and refilled from medical semantics that an MDL decoupler has stripped of "
            "identity."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fedeid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"fedeid: {exc}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"fedeid: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedeid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
