"""The ``normkit`` command line: a table of subcommands.

Each entry of :data:`COMMANDS` names a module that defines ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status); the module is imported only when its subcommand runs, so
``normkit --help`` stays fast. To add a subcommand, add one :class:`Command` line and that module::

    Command("export", "export a model to ONNX with normkit's norm layers", "normkit.onnx.export_command",
            needs=("onnx", "onnxruntime", "onnxscript"), extra="onnx"),

    # normkit/onnx/export_command.py
    def add_arguments(p): p.add_argument("model"); ...
    def run(args) -> int: ...  # raise UsageError("what is wrong; how to fix it") for bad input

Exit status everywhere: 0 success, 1 the command ran and found a failure, 2 usage error, 130 interrupted
(Ctrl-C). A usage error is raised as :class:`UsageError` (anywhere below ``run``): ``main`` prints one line on
stderr -- the problem and the fix -- and exits 2, with the traceback only under ``--debug``. A command whose
extra is not installed says which one to install (``needs``), before its module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)


class UsageError(Exception):
    """Bad input from the user: printed as one line (``normkit <command>: <message>``), exit status 2."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    module: str  # defines add_arguments(parser), run(args) -> int, and optionally EPILOG (shown under --help)
    needs: tuple[str, ...] = ()  # top-level modules the command imports (an optional extra)
    extra: str | None = None     # the pip extra that installs them


ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")

COMMANDS = [
    Command("check", "where torch's norm layers break (dtype, input scale, layer) and whether normkit's hold",
            "normkit.check.command"),
    Command("export", "export a model to ONNX with robust normalization subgraphs (or native ops), optionally verified",
            "normkit.onnx.export_command", ONNX_MODULES, "onnx"),
    Command("harden", "rewrite the normalization nodes of an ONNX file as robust subgraphs, optionally verified",
            "normkit.onnx.harden_command", ONNX_MODULES, "onnx"),
    Command("build", "compile the native CPU kernels now (once per machine, torch version and source) and show their status",
            "normkit.build_command"),
]


ONNX_CHECK = Command("check", COMMANDS[0].help, "normkit.check.onnx_command", ONNX_MODULES, "onnx")


def _command_of(c: Command, argv: list[str]) -> Command:
    """``normkit check MODEL.onnx`` (any argument ending in .onnx) is the ONNX check, with its own arguments."""
    if c.name == "check" and any(a.endswith(".onnx") and not a.startswith("-") for a in argv):
        return ONNX_CHECK
    return c


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, no usage dump
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def usage_error(prog: str, err: BaseException, debug: bool = False) -> int:
    """Report a usage error as one line on stderr (traceback too under --debug); returns 2."""
    if debug:
        traceback.print_exception(err)
    print(f"{prog}: {err}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------ helpers
def elapsed() -> tuple[float, float]:
    """``(wall, cpu)`` seconds since this process started, interpreter and imports included (wall: from
    ``/proc`` where there is one, else since this module was imported)."""
    wall = time.perf_counter() - _IMPORTED
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        wall = max(wall, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        pass
    return wall, time.process_time()


_IMPORTED = time.perf_counter()


def timing_line(*notes: str) -> str:
    """``(12.3 s, 11.8 s CPU since start-up; <note>; ...)``: what a command prints last (empty notes left out)."""
    wall, cpu = elapsed()
    return "(" + "; ".join([f"{wall:.1f} s, {cpu:.1f} s CPU since start-up", *(n for n in notes if n)]) + ")"


def output_file(text: str, option: str) -> Path:
    """The path of a file to write, checked before any work: not empty, not a directory, in a directory that
    exists and can be written to."""
    if not text:
        raise UsageError(f"{option} '': give the path of the file to write")
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"{option} {text}: that is a directory; give a file path, e.g. {path / 'model.onnx'}")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {text}: directory {str(parent)!r} does not exist; create it or write elsewhere")
    _probe_write(parent, f"{option} {text}")
    return path


def output_dir(text: str, option: str) -> Path:
    """A directory to write into, created (with its parents) and checked before any work."""
    if not text:
        raise UsageError(f"{option} '': give the directory to write into")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {text}: that is a file, not a directory; give a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option} {text}: cannot create the directory ({e.strerror}); give a writable path") from e
    _probe_write(path, f"{option} {text}")
    return path


def _probe_write(directory: Path, what: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UsageError(f"{what}: cannot write into {str(directory)!r} ({e.strerror}); give a writable path") from e


_NEGATIVE = re.compile(r"^-[0-9.]")


def _join_negative_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--input-shape -1,3,32,32`` -> ``--input-shape=-1,3,32,32``: argparse takes a value that starts with
    '-' only in the ``=`` form (else: "expected one argument"); the command's own check then names what is
    wrong with the value."""
    takes_value = {s for a in parser._actions if a.nargs is None and a.option_strings for s in a.option_strings}
    out: list[str] = []
    for token in argv:
        if out and out[-1] in takes_value and _NEGATIVE.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _missing(c: Command) -> list[str]:
    return [m for m in c.needs if importlib.util.find_spec(m) is None]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    import torch

    from . import __version__

    # the parser has every subcommand; only the chosen one's module is imported and adds its arguments
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of a usage error")
    parser = _Parser(prog="normkit", description="Numerically robust normalization operators for PyTorch.",
                     epilog="exit status: 0 success, 1 a failure found, 2 usage error, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"normkit {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.help, parents=[common],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if c.name == chosen:
            c = _command_of(c, argv)
            missing = _missing(c)
            if missing:
                print(f"normkit {c.name}: needs the {c.extra} extra ({', '.join(missing)} not installed); "
                      f"install it with pip install 'normkit[{c.extra}]'", file=sys.stderr)
                return 2
            module = importlib.import_module(c.module)
            p.epilog = getattr(module, "EPILOG", None)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
            argv = _join_negative_values(argv, p)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help/--version (0) or an argparse usage error (2, one line already printed)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args._run(args)
    except UsageError as e:
        return usage_error(f"normkit {args.command}", e, args.debug)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"normkit {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
