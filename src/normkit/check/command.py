"""``normkit check``: its arguments and what it runs (the ``check`` entry of :data:`normkit.cli.COMMANDS`)."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import _native
from ..cli import INTERRUPTED, UsageError, output_dir, timing_line
from .cases import DTYPES, OP_NAMES

# what the bare command probes after the op sweep: (zoo name, input shape, dtypes)
DEFAULT_PROBES = [
    ("alexnet", (1, 3, 99, 99), ("float32", "bfloat16", "float16")),
    ("resnet18", (2, 3, 48, 48), ("float32",)),
]
FAST_PROBES = [("alexnet", (1, 3, 67, 67), ("float32",))]
DEFAULT_SCALES = (1.0, 1e4, 1e20)
FAST_SCALES = (1.0, 1e20)

HELP = "where torch's norm layers break (dtype, input scale, layer) and whether normkit's hold"
EPILOG = """exit status: 0 every normkit case passes; 1 something still fails (a normkit case, normkit's model
output, a wrong output no layer explains, or a reference that is not float64); 2 usage error; 130 Ctrl-C
(what finished is printed).
without --model: the op sweep (every op x float32/float16/bfloat16 x magnitudes 1e-3..top, offsets,
constants), then a layer-by-layer probe of alexnet and resnet18. With --model: that model only."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", action="append", choices=OP_NAMES, help="sweep only this op (repeatable); skips the default model probe")
    p.add_argument("--dtype", action="append", choices=list(DTYPES), help="only this dtype (repeatable)")
    p.add_argument("--model", action="append", metavar="NAME|FILE.py:FACTORY",
                   help="probe this model instead: a zoo name or a file and a function returning an nn.Module (repeatable)")
    p.add_argument("--input-shape", metavar="N,C,H,W", help="input shape for --model (default: the zoo's, or the "
                   "model's example_input_shape attribute)")
    p.add_argument("--input-kind", choices=("auto", "tokens", "float"),
                   help="the model's input: token ids (the scale then multiplies the input embedding's output to that "
                        "root mean square) or a float tensor times the scale; auto (default): token ids when the model's "
                        "first module is an nn.Embedding (Hugging Face: get_input_embeddings())")
    p.add_argument("--scales", metavar="S1,S2,...", help="input scales for the model probe (default 1,1e4,1e20)")
    p.add_argument("--mode", choices=("train", "eval"),
                   help="norm layers on batch statistics (train, default; dropout stays off) or running statistics (eval)")
    p.add_argument("--report", metavar="DIR", help="write report.md, results.json and PNG plots to DIR")
    p.add_argument("--json", action="store_true", help="print the results as strict JSON to stdout instead of the table")
    p.add_argument("--quiet", action="store_true", help="print no table and no progress bar (the exit status tells)")
    p.add_argument("--fast", action="store_true", help="a reduced sweep and probe (for tests and CI smoke runs)")
    p.add_argument("--seed", default="0", help="seed of every random input (an integer 0 <= seed < 2**63)")


def parse_seed(text: str) -> int:
    try:
        seed = int(text, 0)
    except ValueError:
        raise UsageError(f"--seed {text!r} is not an integer; use e.g. --seed 0") from None
    if not 0 <= seed < 2**63:
        raise UsageError(f"--seed {text} is out of range; use an integer 0 <= seed < 2**63") from None
    return seed


def parse_scales(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            v = float(part)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or v <= 0:
            raise UsageError(f"--scales: {part.strip()!r} is not a positive number; give positive numbers "
                             f"separated by commas, e.g. --scales 1,1e4,1e20")
        out.append(v)
    return out


def parse_shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.replace("x", ",").replace("(", "").replace(")", "").split(",")]
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError:
        shape = ()
    if shape and any(s < 0 for s in shape):
        raise UsageError(f"--input-shape {text}: sizes cannot be negative (no -1 wildcard: the probe draws one "
                         f"input of exactly this shape); give every size, e.g. --input-shape "
                         f"{','.join(str(abs(s) or 1) for s in shape)}")
    if not shape or any(s == 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} is not a shape; give positive integers separated by commas, "
                         f"e.g. --input-shape 2,3,224,224")
    return shape


@contextlib.contextmanager
def progress_bar(total: int, label: str, enabled: bool):
    """A rich progress bar on stderr, only when stderr is a terminal; yields ``advance(n, total=None)``
    (``total``: the new total, when the work turns out larger or smaller than first thought)."""
    if not enabled or total <= 0 or not sys.stderr.isatty():
        yield lambda n=1, total=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n=1, total=None: prog.update(task, advance=n, total=total)


@dataclass
class _Plan:
    """What one ``normkit check`` run does, every argument checked before any work starts."""

    seed: int
    ops: list[str] | None          # the op sweep's ops (None: every op); empty: no sweep
    dtypes: list | None
    targets: list[tuple]           # (name, model, input shape, dtypes) to probe
    scales: list[float]
    mode: str
    out_dir: Path | None
    tokens: bool | None = None     # --input-kind: None detects token-id models


def plan(args: argparse.Namespace) -> _Plan:
    """Every argument checked and every model loaded, or a :class:`UsageError` naming the problem."""
    from . import models as user_models
    from .probe import input_embedding

    seed = parse_seed(args.seed)
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else None
    scales = parse_scales(args.scales) if args.scales is not None else None
    shape = parse_shape(args.input_shape) if args.input_shape is not None else None
    if args.op and args.model:
        raise UsageError("--op selects ops of the op sweep, which --model replaces; use one or the other")
    if args.op and (shape or scales or args.mode or args.input_kind):
        raise UsageError("--input-shape/--input-kind/--scales/--mode apply to the model probe, which --op skips; drop "
                         "them, or use --model NAME instead of --op")
    if shape and args.model and len(args.model) > 1:
        raise UsageError("--input-shape applies to one model; give one --model with it")
    out_dir = output_dir(args.report, "--report") if args.report is not None else None
    if out_dir is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--report needs matplotlib: pip install 'normkit[plot]'") from None

    # what to probe: (name, model, shape, dtypes); every model is loaded before any work starts
    targets = []
    if args.model:
        for spec in args.model:
            name, model, default_shape = user_models.load(spec, seed)
            if (shape or default_shape) is None:
                raise UsageError(f"--model {spec}: give --input-shape (the model has no example_input_shape)")
            targets.append((name, model, shape or default_shape, dtypes or list(DTYPES.values())))
    elif not args.op:
        from .. import models as zoo

        for name, shp, dts in (FAST_PROBES if args.fast else DEFAULT_PROBES):
            dts = [DTYPES[d] for d in dts if not dtypes or DTYPES[d] in dtypes]
            if dts:
                targets.append((name, zoo.get(name, seed=seed), shp if shape is None else shape, dts))
    scales = scales or list(FAST_SCALES if args.fast and not args.model else DEFAULT_SCALES)
    ops = [] if args.model else (args.op or list(OP_NAMES))
    tokens = {"tokens": True, "float": False}.get(args.input_kind)
    for name, model, _, _ in targets if tokens else ():
        if input_embedding(model) is None:
            raise UsageError(f"--input-kind tokens: {name} has no input embedding to scale (its first module is no "
                             f"nn.Embedding, and it has no get_input_embeddings()); drop --input-kind, or use "
                             f"--input-kind float")
    return _Plan(seed, ops, dtypes, targets, scales, args.mode or "train", out_dir, tokens)


def run(args: argparse.Namespace) -> int:
    import torch

    from . import probe, report, sweep

    todo = plan(args)
    show = not args.quiet and not args.json
    rows, results, interrupted = [], [], False
    with _native.recording():  # which path each op takes, for the report's backend section
        try:
            if todo.ops:
                per_op = []
                try:
                    with progress_bar(sweep.count(todo.ops, todo.dtypes, args.fast), "op sweep", show) as advance:
                        for op in todo.ops:  # op by op: on Ctrl-C, every finished op is reported
                            per_op.append(sweep.run([op], todo.dtypes, todo.seed, fast=args.fast, progress=advance))
                finally:  # each op ran the same inputs in the same order: back to the sweep's input-major order
                    rows = [r for same_input in zip(*per_op) for r in same_input]
            for name, model, shp, dts in todo.targets:
                n = sum(1 for d in dts for s in todo.scales if s <= torch.finfo(d).max)
                with progress_bar(n, f"probe {name}", show) as advance:
                    try:
                        results.append(probe.probe(model, shp, name=name, dtypes=dts, scales=todo.scales,
                                                   mode=todo.mode, seed=todo.seed, progress=advance, tokens=todo.tokens))
                    except probe.ProbeInputError as e:
                        raise UsageError(f"{e}; pass an --input-shape (and --input-kind) that the model accepts") from e
        except KeyboardInterrupt as e:
            interrupted = True
            if isinstance(e, probe.ProbeInterrupted) and e.partial.cases:
                results.append(e.partial)
        backend = report.backend_info(_native.status(), _native.paths_seen())

    if todo.out_dir is not None:
        from . import plots

        files = []
        if rows:
            files += plots.op_plots(rows, todo.out_dir)
        files += [plots.model_plot(m, todo.out_dir) for m in results]
        (todo.out_dir / "results.json").write_text(
            report.dumps(rows, results, todo.seed, backend, complete=not interrupted) + "\n")
        (todo.out_dir / "report.md").write_text(report.markdown(rows, results, files, backend))
    if args.json:
        print(report.dumps(rows, results, todo.seed, backend, complete=not interrupted))
    elif show:
        if sys.stdout.isatty():
            report.print_rich(rows, results, backend)
        else:
            print(report.text(rows, results, backend))
        print(timing_line(f"report in {todo.out_dir}" if todo.out_dir else ""))
    if interrupted:
        done = f"{len(rows)} op case(s), {sum(len(m.cases) for m in results)} layer case(s)"
        print(f"normkit check: interrupted (Ctrl-C); what finished is reported above ({done})", file=sys.stderr)
        return INTERRUPTED
    return 0 if report.ok(rows, results) else 1
