"""The ``teltonika`` console script: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is
imported only when its subcommand runs, so ``teltonika decode`` never imports Redis or the
reactor. ``python -m teltonika`` is the same program.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "decode": ("teltonika.cli.decode", "decode hex frames into JSON, one object per frame"),
    "send": ("teltonika.cli.send", "send a codec 12/14 command to a tracker through Redis"),
    "simulate": ("teltonika.cli.simulate", "run a simulated tracker fleet against a server"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="teltonika", description="Tools for the Teltonika tracker server."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((arg for arg in args_list if arg in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    args = parser.parse_args(args_list)
    status: int = args._run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
