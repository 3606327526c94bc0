"""The ``normkit`` command line. ``normkit check`` shows where torch's norm layers break and that
normkit's do not; it exits 0 when every normkit case passes, 1 otherwise, 2 on a usage error."""

from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, no usage dump
        self.exit(2, f"normkit: {message} (see normkit --help)\n")


def main(argv=None) -> int:
    from . import check

    parser = _Parser(prog="normkit", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("check", help="compare torch's and normkit's norm ops against a float64 reference")
    p.add_argument("--op", action="append", choices=[o.name for o in check.OPS], help="restrict to this op (repeatable)")
    p.add_argument("--dtype", action="append", choices=list(DTYPES), help="restrict to this dtype (repeatable)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("build", help="compile the native kernels now (once per machine and torch version)")
    sub.add_parser("bench", help="run the benchmark suite from a checkout (python -m benchmarks ARGS)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command in ("build", "bench"):
        return _native_command(args.command, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        parser.print_help()
        return 2
    rows = check.run(args.op, [DTYPES[d] for d in args.dtype] if args.dtype else None, args.seed)
    if args.json:
        print(json.dumps([dict(vars(r), torch_ok=r.torch_ok, normkit_ok=r.normkit_ok) for r in rows], indent=1))
    else:
        print(check.report(rows))
    return 0 if all(r.normkit_ok for r in rows) else 1


def _native_command(command: str, rest: list[str]) -> int:
    """``normkit build``: compile the kernels, print the status; ``normkit bench ARGS``: the benchmark runner."""
    if command == "build":
        from . import _native

        try:
            print(json.dumps(_native.build(force="--force" in rest), indent=1))
        except RuntimeError as exc:
            print(f"normkit: {exc}", file=sys.stderr)
            return 1
        return 0
    import os

    sys.path.insert(0, os.getcwd())
    try:
        from benchmarks.runner import main as bench_main
    except ImportError:
        print("normkit: bench runs from a normkit checkout (the benchmarks/ folder); cd there first", file=sys.stderr)
        return 2
    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
