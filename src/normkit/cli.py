"""The ``normkit`` command line: a table of subcommands.

Each entry of :data:`COMMANDS` names a module that defines ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status); the module is imported only when its subcommand runs, so
``normkit --help`` stays fast. To add a subcommand, add one :class:`Command` line and that module::

    Command("export", "export a model to ONNX with normkit's norm layers", "normkit.onnx.export_command"),

    # normkit/onnx/export_command.py
    def add_arguments(p): p.add_argument("model"); ...
    def run(args) -> int: ...  # raise UsageError("what is wrong; how to fix it") for bad input

Exit status everywhere: 0 success, 1 the command ran and found a failure, 2 usage error. A usage error
is raised as :class:`UsageError` (anywhere below ``run``): ``main`` prints one line on stderr -- the
problem and the fix -- and exits 2, with the traceback only under ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from dataclasses import dataclass


class UsageError(Exception):
    """Bad input from the user: printed as one line (``normkit <command>: <message>``), exit status 2."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    module: str  # defines add_arguments(parser), run(args) -> int, and optionally EPILOG (shown under --help)


COMMANDS = [
    Command("check", "where torch's norm layers break (dtype, input scale, layer) and whether normkit's hold",
            "normkit.check.command"),
    Command("export", "export a model to ONNX with robust normalization subgraphs (or native ops), optionally verified",
            "normkit.onnx.export_command"),
    Command("harden", "rewrite the normalization nodes of an ONNX file as robust subgraphs, optionally verified",
            "normkit.onnx.harden_command"),
    Command("build", "compile the native CPU kernels now (once per machine, torch version and source) and show their status",
            "normkit.build_command"),
]


def _module_of(c: Command, argv: list[str]) -> str:
    """``normkit check MODEL.onnx`` (any argument ending in .onnx) is the ONNX check, with its own arguments."""
    if c.name == "check" and any(a.endswith(".onnx") and not a.startswith("-") for a in argv):
        return "normkit.check.onnx_command"
    return c.module


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, no usage dump
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def usage_error(prog: str, err: BaseException, debug: bool = False) -> int:
    """Report a usage error as one line on stderr (traceback too under --debug); returns 2."""
    if debug:
        traceback.print_exception(err)
    print(f"{prog}: {err}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the parser has every subcommand; only the chosen one's module is imported and adds its arguments
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of a usage error")
    parser = _Parser(prog="normkit", description="Numerically robust normalization operators for PyTorch.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.help, parents=[common],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if c.name == chosen:
            module = importlib.import_module(_module_of(c, argv))
            p.epilog = getattr(module, "EPILOG", None)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or an argparse usage error (2, one line already printed)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args._run(args)
    except UsageError as e:
        return usage_error(f"normkit {args.command}", e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
