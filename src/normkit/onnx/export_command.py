"""``normkit export MODEL -o model.onnx [--verify]``: the subcommand's arguments and run (see normkit.cli)."""

from __future__ import annotations

import argparse

EPILOG = """MODEL is a zoo name (alexnet, resnet18, mobilenet_v2, transformer_block, transformer_block_rms) or
path/to/file.py:factory, as for normkit check. By default every normalization layer becomes normkit's robust
primitive-op subgraph; --native writes ONNX's own operators instead (LRN, BatchNormalization, ...).
--verify runs the file in ONNX Runtime (optimizations off; onnx.reference for --float16) against the
float64 model at input scales 1 and 1e20 (float16: 1, 300, 1e4), batch 1 and the example's; exit 1 if an
output is non-finite or off by more than 1e-4 at scale 1, 1e-3 beyond (float16: 4e-3)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a zoo name or path/to/file.py:factory")
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="where to write the ONNX file")
    p.add_argument("--native", action="store_true", help="native ONNX normalization operators (not robust)")
    p.add_argument("--opset", type=int, help="ONNX opset, 18 to 23 (default 18; native GroupNorm 21, RMSNorm 23)")
    p.add_argument("--float16", action="store_true", help="export a float16 graph")
    p.add_argument("--static-batch", action="store_true", help="keep the example's batch size fixed")
    p.add_argument("--input-shape", metavar="N,C,H,W", help="example input shape (default: the zoo's)")
    p.add_argument("--verify", action="store_true", help="run the file against the float64 model and print the errors")
    p.add_argument("--seed", default="0", help="seed of the model's weights and the random inputs")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..check import models as user_models
    from ..check.command import parse_seed, parse_shape
    from ..check.probe import ProbeInputError, draw_input, input_embedding, materialize
    from ..cli import UsageError, output_file
    from . import OnnxError, export_onnx, verify_onnx

    output = output_file(args.output, "-o")  # before any work: a path that cannot be written fails now
    seed = parse_seed(args.seed)
    shape = parse_shape(args.input_shape) if args.input_shape is not None else None
    name, model, default_shape = user_models.load(args.model, seed)
    shape = shape or default_shape
    if shape is None:
        raise UsageError(f"{args.model}: give --input-shape (the model has no example_input_shape)")
    embedding = input_embedding(model)  # token ids in, as normkit check decides
    vocab = model.get_submodule(embedding).num_embeddings if embedding is not None else None
    try:
        model = materialize(model, shape, seed, tokens=embedding is not None)
    except ProbeInputError as e:
        raise UsageError(f"{args.model}: {e}; pass --input-shape that the model accepts") from e
    model.eval()  # a model to deploy; export_onnx would switch to eval mode anyway, with a warning
    dtype = torch.float16 if args.float16 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    example = draw_input(shape, seed, vocab).to(dtype if vocab is None else torch.long)
    try:
        _, report = export_onnx(model, example, str(output), decompose=not args.native, opset=args.opset,
                                dynamic_batch=not args.static_batch, dtype=dtype)
    except OnnxError as e:
        raise UsageError(str(e)) from e
    what = f"{len(report.replaced)} robust normalization subgraph(s)" if report else "native normalization operators"
    print(f"wrote {output}: {name}, {what}")
    if not args.verify:
        return 0
    scales = (1.0, 300.0, 1e4) if args.float16 else (1.0, 1e20)
    if vocab is not None:  # the scale of a token-id model lives in its embedding's weights, which are in the file
        scales = (1.0,)
        print(f"token ids < {vocab} in: verified at input scale 1 only (the input scale of a token-id model is "
              f"that of its embedding's output, whose weights the file holds)")
    batches = sorted({shape[0], 1}) if not args.static_batch else [shape[0]]
    ref_model = model.to(dtype) if args.float16 else model
    failed, lowered = [], set()
    print(f"{'scale':>8} {'batch':>5}  {'output':<12} {'rel err':>10} {'non-finite':>10}  {'tolerance':>9}")
    for scale in scales:
        for b in batches:
            x = (torch.randint(0, vocab, (b,) + tuple(shape[1:]), generator=gen) if vocab is not None
                 else (torch.randn((b,) + tuple(shape[1:]), generator=gen) * scale).to(dtype))
            try:
                errs = verify_onnx(str(output), ref_model, x)
            except OnnxError as e:
                raise UsageError(str(e)) from e
            for e in errs:
                tol = 4e-3 if args.float16 else (1e-4 if scale == 1 else 1e-3)
                if not (e.finite and e.rel_err < tol):
                    failed.append(f"{e.name} at scale {scale:g}, batch {b}")
                lowered.update(e.reference_lowered)
                print(f"{scale:>8.0e} {b:>5}  {e.name[:12]:<12} {e.rel_err:>10.1e} {e.nonfinite:>10}  {tol:>9.0e}")
    if lowered:
        print(f"verify: NOT VERIFIED -- the float64 reference is not float64 throughout ({', '.join(sorted(lowered))})")
        return 1
    if failed:
        print(f"verify: FAIL -- {len(failed)} output(s) off or non-finite: {'; '.join(failed)}")
        return 1
    print(f"verify: PASS -- every output within tolerance at input scales {', '.join(f'{s:g}' for s in scales)} "
          f"and batch {', '.join(map(str, batches))}")
    return 0
