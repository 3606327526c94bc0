"""``normkit check MODEL.onnx``: the ONNX form of the check subcommand (chosen by :mod:`normkit.cli` when an
argument ends in ``.onnx``): its arguments, the inputs it builds, and what it prints and writes."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ..cli import UsageError, output_dir, timing_line
from .command import parse_scales, parse_seed, parse_shape, progress_bar

HELP = "headroom of every normalization in an ONNX file (float16, bfloat16, float32), the first node that breaks, and the fix"
EPILOG = """exit status: 0 every norm passes (with --fix: every norm of the fixed file); 1 a norm fails (error
out of tolerance, non-finite, an intermediate beyond the dtype's range) or a graph output is non-finite
where float64 is finite; 2 usage error (one line; --debug shows the traceback).
Finds native norm nodes, ONNX Runtime's contrib norms, the decomposed LayerNorm/RMSNorm/E[x^2]-E[x]^2/
TensorFlow batch-norm patterns harden_onnx rewrites, and the regions a previous harden wrote, in the main
graph, in If/Loop/Scan bodies and in model-local functions; runs the graph with each norm's input and output
exposed and its float64 copy on the same inputs, and judges each norm alone on the float64 input to it,
rounded to the dtype. A float64 file is its own reference: its norms pass by construction."""

DEFAULT_SCALES = {"float16": (1.0, 1e2, 1e3, 1e4), "bfloat16": (1.0, 1e10, 1e20), "float32": (1.0, 1e10, 1e20),
                  "float64": (1.0, 1e50, 1e100)}
NO_BF16_CONVERTER = ("--dtype bfloat16: no well-kept converter turns a float32 ONNX file into bfloat16 here "
                     "(onnxconverter-common converts to float16 only; NVIDIA Model Optimizer's autocast would replace "
                     "this environment's onnx and ONNX Runtime); export the model in bfloat16 instead "
                     "(torch.onnx.export of model.to(torch.bfloat16)) and check that file")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX file to check")
    p.add_argument("--input-shape", action="append", metavar="[NAME=]D1,D2,...",
                   help="shape of the random input (repeatable, NAME= for a graph with several inputs; default: "
                        "the declared static shape)")
    p.add_argument("--inputs", metavar="FILE.npz", help="real calibration inputs, one array per graph input name")
    p.add_argument("--scales", metavar="S1,S2,...", help="multiply the float inputs by each (default float16: "
                   "1,1e2,1e3,1e4; bfloat16 and float32: 1,1e10,1e20; float64: 1,1e50,1e100; with --inputs: 1)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="check in this dtype (default: the "
                   "file's own; float16 converts a float32 file with onnxconverter-common; bfloat16 is refused: no "
                   "well-kept converter)")
    p.add_argument("--evaluator", choices=("reference", "ort"), help="reference: onnx.reference, every node in its "
                   "declared dtype (default for float16 and bfloat16); ort: ONNX Runtime CPU (default for float32 and "
                   "float64; it cannot run bfloat16)")
    p.add_argument("--fix", metavar="OUT.onnx", help="write the hardened graph (harden_onnx) and check it too")
    p.add_argument("--report", metavar="DIR", help="write report.md, results.json and PNG plots to DIR")
    p.add_argument("--json", action="store_true", help="print the results as strict JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors; the exit status tells")
    p.add_argument("--seed", default="0", help="seed of the random inputs (an integer 0 <= seed < 2**63)")


def _shapes(args, graph_inputs: list) -> dict[str, tuple[int, ...]]:
    names = [v.name for v in graph_inputs]
    shapes: dict[str, tuple[int, ...]] = {}
    for text in args.input_shape or []:
        name, sep, dims = text.rpartition("=")
        if not sep:
            if len(names) != 1:
                raise UsageError(f"--input-shape {text}: the graph has {len(names)} inputs ({', '.join(names)}); "
                                 f"name each, as --input-shape {names[0] if names else 'x'}={dims}")
            name = names[0]
        if name not in names:
            raise UsageError(f"--input-shape {text}: the graph has no input {name!r}; its inputs are {', '.join(names)}")
        shapes[name] = parse_shape(dims)
    return shapes


def _declared(v) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]


def build_feeds(args, model, seed: int) -> dict[str, np.ndarray]:
    """The base inputs (before scaling): --inputs arrays, --input-shape draws, or the declared static shapes."""
    from .onnx_probe import graph_inputs, random_feeds

    ins = graph_inputs(model)
    names = [v.name for v in ins]
    given: dict[str, np.ndarray] = {}
    if args.inputs:
        if not os.path.isfile(args.inputs):
            raise UsageError(f"--inputs {args.inputs}: no such file; give an .npz with one array per input ({', '.join(names)})")
        try:
            with np.load(args.inputs, allow_pickle=False) as z:
                given = {k: z[k] for k in z.files}
        except Exception as e:
            raise UsageError(f"--inputs {args.inputs}: not an .npz file ({type(e).__name__}); save one with "
                             f"numpy.savez(path, {names[0] if names else 'x'}=array)") from None
        unknown = [k for k in given if k not in names]
        if unknown:
            raise UsageError(f"--inputs {args.inputs}: the graph has no input {unknown[0]!r}; its inputs are {', '.join(names)}")
    shapes = _shapes(args, ins)
    both = set(shapes) & set(given)
    if both:
        raise UsageError(f"input {sorted(both)[0]!r} is given by --inputs and by --input-shape; keep one")
    for v in ins:
        if v.name in given or v.name in shapes:
            continue
        decl = _declared(v)
        if v.type.tensor_type.HasField("shape") and all(isinstance(d, int) and d > 0 for d in decl):
            shapes[v.name] = tuple(decl)
        else:
            example = ",".join(str(d) if isinstance(d, int) and d > 0 else "2" for d in decl) or "2,8"
            raise UsageError(f"input {v.name!r} has shape ({', '.join(map(str, decl))}) with symbolic dims; give "
                             f"--input-shape {'' if len(ins) == 1 else v.name + '='}{example} or --inputs FILE.npz")
    for v in ins:  # the declared static dims must match
        decl = _declared(v)
        shape = shapes.get(v.name) or tuple(given[v.name].shape)
        if v.type.tensor_type.HasField("shape") and (len(decl) != len(shape) or any(
                isinstance(d, int) and d > 0 and d != s for d, s in zip(decl, shape))):
            raise UsageError(f"input {v.name!r} is declared ({', '.join(map(str, decl))}); the shape given, "
                             f"{tuple(shape)}, does not fit it")
    feeds = random_feeds(model, shapes, seed) if shapes else {}
    import onnx

    for v in ins:
        if v.name in given:
            feeds[v.name] = given[v.name].astype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
    return {v.name: feeds[v.name] for v in ins}


def run(args: argparse.Namespace) -> int:
    from ..onnx import OnnxError
    from ..onnx.harden import load_model
    from . import onnx_report
    from .onnx_probe import FLOAT_ELEMS, graph_dtype, probe_onnx, to_float16

    seed = parse_seed(args.seed)
    scales = parse_scales(args.scales) if args.scales else None
    if not args.model.endswith(".onnx"):
        raise UsageError(f"{args.model}: the ONNX check takes a .onnx file")
    if args.fix and not args.fix.endswith(".onnx"):
        raise UsageError(f"--fix {args.fix}: give the path of the .onnx file to write")
    out_dir = None
    if args.report is not None:
        out_dir = output_dir(args.report, "--report")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--report needs matplotlib: pip install 'normkit[plot]'") from None
    name = os.path.basename(args.model)
    try:
        model = load_model(args.model)
        own = FLOAT_ELEMS.get(graph_dtype(model))
        converted = ""
        if args.dtype and args.dtype != own:
            if args.dtype == "bfloat16":
                raise UsageError(NO_BF16_CONVERTER)
            if (own, args.dtype) != ("float32", "float16"):
                raise UsageError(f"--dtype {args.dtype}: the file is {own or 'not a float graph'}; normkit "
                                 f"converts float32 files to float16 only")
            model = to_float16(model)
            converted = " (converted from float32 by onnxconverter-common)"
        feeds = build_feeds(args, model, seed)
        dtype = FLOAT_ELEMS.get(graph_dtype(model), "float32")
        scales = scales or ([1.0] if args.inputs else list(DEFAULT_SCALES[dtype]))
        show = not args.quiet and not args.json
        with progress_bar(2 * len(scales), f"check {name}", show) as advance:  # probe_onnx sets the total
            result = probe_onnx(model, feeds, scales, name=name, evaluator=args.evaluator, progress=advance)
        result.converted = converted
        fixed = None
        if args.fix:
            from ..onnx import harden_onnx

            hardened, _report = harden_onnx(model, args.fix)
            with progress_bar(2 * len(scales), f"check {os.path.basename(args.fix)}", show) as advance:
                fixed = probe_onnx(hardened, feeds, scales, name=os.path.basename(args.fix), evaluator=result.evaluator,
                                   progress=advance)
    except OnnxError as e:
        raise UsageError(str(e)) from e

    if out_dir is not None:
        files = onnx_report.plots(result, fixed, out_dir)
        (out_dir / "results.json").write_text(onnx_report.dumps(result, fixed, args.fix, seed) + "\n")
        (out_dir / "report.md").write_text(onnx_report.markdown(result, fixed, args.fix, files))
    if args.json:
        print(onnx_report.dumps(result, fixed, args.fix, seed))
    elif show:
        if sys.stdout.isatty():
            onnx_report.print_rich(result, fixed, args.fix)
        else:
            print(onnx_report.text(result, fixed, args.fix))
        print(timing_line(f"wrote {args.fix}" if args.fix else "", f"report in {out_dir}" if out_dir else ""))
    return 0 if (fixed or result).ok else 1
