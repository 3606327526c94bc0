"""``normkit harden in.onnx -o out.onnx [--verify]``: the subcommand's arguments and run (see normkit.cli)."""

from __future__ import annotations

import argparse

EPILOG = """Replaces every normalization node (LRN, BatchNormalization, InstanceNormalization, LayerNormalization,
GroupNormalization, RMSNormalization, com.microsoft SimplifiedLayerNormalization / SkipLayerNormalization)
and the decomposed LayerNorm / RMSNorm patterns exporters emit by normkit's robust primitive-op subgraphs.
--verify runs original and hardened side by side on random inputs at several scales (float32 in ONNX
Runtime, optimizations off; float16 in onnx.reference) against the original graph in float64; exit 1 if
the hardened model is non-finite or off by more than 1e-3 (float16: 4e-3) anywhere."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN.onnx", help="the ONNX model to harden")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the hardened model")
    p.add_argument("--verify", action="store_true", help="compare original and hardened against float64")
    p.add_argument("--scales", metavar="S1,S2,...", help="input scales for --verify (default: 1,1e10,1e19,1e20,1e-20; "
                   "float16: 1,300,1e4,1e-3)")
    p.add_argument("--batch", type=int, default=2, help="size of each symbolic dimension in --verify's inputs")
    p.add_argument("--seed", default="0", help="seed of --verify's random inputs")


def run(args: argparse.Namespace) -> int:
    import onnx

    from ..check.command import parse_scales, parse_seed
    from ..cli import UsageError, output_file
    from . import OnnxError, compare_onnx, format_rows, harden_onnx
    from .harden import load_model
    from .verify import _input_dtype

    output = output_file(args.output, "-o")  # before any work: a path that cannot be written fails now
    seed = parse_seed(args.seed)
    scales = parse_scales(args.scales) if args.scales is not None else None
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch}: give a positive size, e.g. --batch 2")
    try:
        original = load_model(args.input)
        hardened, report = harden_onnx(original, str(output))
    except OnnxError as e:
        raise UsageError(str(e)) from e
    print(f"wrote {output}: {report}")
    if not args.verify:
        return 0
    try:
        rows = compare_onnx(original, hardened, scales=scales, seed=seed, batch=args.batch)
    except OnnxError as e:
        raise UsageError(str(e)) from e
    print(format_rows(rows))
    tol = 4e-3 if _input_dtype(original) == onnx.TensorProto.FLOAT16 else 1e-3
    bad = [r for r in rows if not (r.hardened.finite and r.hardened.rel_err < tol)]
    if bad:
        print(f"verify: FAIL -- the hardened model is off by more than {tol:g} or non-finite at "
              f"{'; '.join(f'{r.output} scale {r.scale:g}' for r in bad)}")
        return 1
    print(f"verify: PASS -- the hardened model is within {tol:g} of float64 at every scale and output")
    return 0
