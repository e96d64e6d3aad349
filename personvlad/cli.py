"""The ``personvlad`` command line: one entry point with subcommands.

Each feature module contributes its subcommands through a
``register(subparsers)`` function listed in ``COMMAND_MODULES``; the module is
imported only to build the parser, so ``personvlad --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

COMMAND_MODULES = [
    "personvlad.demo",          # personvlad demo
    "personvlad.data.cli",      # personvlad synth | pack
    "personvlad.engine.cli",    # personvlad train | extract
    "personvlad.eval.cli",      # personvlad evaluate | index | search | visualize
    "personvlad.bench_report",  # personvlad bench report | table
    "personvlad.deploy",        # personvlad export
]


def build_parser(modules: Optional[List[str]] = None) -> argparse.ArgumentParser:
    """The argparse tree of ``modules`` (default: every command module)."""
    parser = argparse.ArgumentParser(
        prog="personvlad",
        description="Video person re-identification with 3D PersonVLAD.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `personvlad <command> --help` for a command's options and an example.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"personvlad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES if modules is None else modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None, modules: Optional[List[str]] = None) -> int:
    """Run a command; ``modules`` restricts the tree (``python -m
    personvlad.eval.cli ...`` runs only that module's commands)."""
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (ValueError, OSError) as e:  # OSError: a missing file, a directory given as a file, ...
        # bad input (a missing file, a malformed config or data set): the
        # message names it; no traceback.  PERSONVLAD_TRACEBACK=1 shows one.
        if os.environ.get("PERSONVLAD_TRACEBACK") == "1":
            raise
        print(f"personvlad {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
