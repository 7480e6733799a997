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
    "fedeid.dicom.commands",
    "fedeid.federated.commands",
)
# Commands whose module imports no torch: parsed with that module alone, so `fedeid dicom deid`
# (header-only) starts in a fraction of a second instead of paying the 1.7 s torch import.
LIGHT_COMMANDS = {"dicom": "fedeid.dicom.commands"}


def build_parser(modules: tuple[str, ...] = COMMAND_MODULES) -> argparse.ArgumentParser:
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
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    light = LIGHT_COMMANDS.get(argv[0]) if argv else None
    parser = build_parser((light,) if light else COMMAND_MODULES)
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
