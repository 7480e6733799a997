"""The ``fedeid`` command.

Each subcommand lives beside the code it drives and registers itself through a
``register(subparsers)`` function, so this file stays an index. Only the module of the command
being run is imported: ``fedeid --help`` lists the commands from :data:`COMMANDS` alone, so it
(and every command's ``--help``) starts without importing torch, pydicom or the models.

Every command follows one exit-code convention (:data:`fedeid.io.EXIT_CODES_HELP`): 0 all done,
1 some inputs failed or were refused, 2 usage error or nothing to do. A user mistake never
shows a traceback: it reads ``fedeid: <file>: <reason>``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fedeid import __version__
from fedeid.io import EXIT_CODES_HELP, EXIT_USAGE, InputError

# command -> (module whose ``register`` defines it, the one line ``fedeid --help`` shows for it),
# in the order ``fedeid --help`` lists them. Keeping the lines here lets the help list every
# command without importing any of them.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("fedeid.data.commands", "write the synthetic chest X-ray benchmark as 16-bit PNGs + labels.csv"),
    "train": ("fedeid.commands", "train ReID + decoupler + decoder centrally and save a checkpoint"),
    "deid": ("fedeid.commands", "de-identify a folder of images at a privacy level"),
    "evaluate": ("fedeid.commands", "privacy/utility/quality of fedeid vs baselines (JSON + PNG)"),
    "counterfactual": ("fedeid.deid.commands", "the same patient with another finding (method B checkpoints)"),
    "dicom": ("fedeid.dicom.commands", "de-identify DICOM: pixels by the model, headers by the PS3.15 Annex E profile"),
    "simulate": ("fedeid.federated.commands", "federated training over simulated hospitals (Flower), then the report"),
    "certs": ("fedeid.federated.commands", "create a CA, the SuperLink TLS certificate and SuperNode keys"),
    "deploy": ("fedeid.federated.commands", "write a whole deployment: certificates, Fleet-only nginx proxy, start scripts, site configs"),
    "site": ("fedeid.federated.commands", "a hospital's SuperNode that runs only its pinned app; the app pin"),
    "audit": ("fedeid.audit.commands", "the site's tamper-evident audit log: keys, checkpoints, verification"),
    "report": ("fedeid.riskreport.commands", "the signed re-identification risk report a privacy officer reviews (HTML + JSON)"),
}


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The parser with ``command``'s module registered for real (``"*"``: every module).

    Other commands appear as one-line entries, so ``fedeid --help`` and a mistyped command
    import nothing heavy; the one being run gets its full arguments and help.
    """
    parser = argparse.ArgumentParser(
        prog="fedeid",
        description=(
            "Federated, adjustable de-identification of medical images. Identity-relevant "
            "regions (found by a re-identification network) are blocked at a privacy level in "
            "[0, 1] and refilled from medical semantics that an MDL decoupler has stripped of "
            "identity. Inputs are never modified; outputs never land inside an input and never "
            "replace a file fedeid did not write unless --overwrite is given."
        ),
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"fedeid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    every = dict.fromkeys(module for module, _ in COMMANDS.values())
    modules = every if command == "*" else [COMMANDS[command][0]] if command in COMMANDS else []
    for module in modules:
        importlib.import_module(module).register(sub)
    for name, (module, help_line) in COMMANDS.items():
        if module not in modules:
            sub.add_parser(name, help=help_line, add_help=False)
    order = list(COMMANDS)
    listed = sub._choices_actions  # noqa: SLF001 - argparse has no public accessor
    listed.sort(key=lambda action: order.index(action.dest))
    for action in listed:  # one line per command, from COMMANDS whichever module registered it
        action.help = COMMANDS[action.dest][1]
    return parser


def command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: the first word that is not an option (the top level
    has only ``--help`` and ``--version``, neither taking a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (InputError, ValueError, KeyError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            FileExistsError, PermissionError) as exc:
        print(f"fedeid: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedeid: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """An OSError reads ``<file>: <reason>`` like an InputError; anything else its first line."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return (text.splitlines() or [type(exc).__name__])[0]


if __name__ == "__main__":
    sys.exit(main())
