"""normkit benchmarks: normkit (default backend), normkit's eager reference, torch and ONNX Runtime, timed in one
process, interleaved, medians after warm-up.

Groups (``--group``, repeatable; default ``ops`` and ``models``): ``ops`` (the operators on large shapes),
``models`` (zoo models at batch 8), ``small`` (single calls on small tensors: microseconds per call, normkit
against torch, 1 thread), ``batch1`` (zoo models at batch 1 in eval, 1 thread), ``compiled`` (zoo models under
``torch.compile``, normkit's converted model against torch's, both compiled; the compile time is reported
apart). Small calls are timed in loops of as many calls as fill about a millisecond, each loop one sample.

Per case and mode (fwd, fwd+bwd) it reports each provider's median time and its spread (interquartile range
over the median: how noisy the machine was), normkit / torch and normkit / ONNX Runtime ratios, normkit's
achieved GB/s and its multiple of the memory-traffic floor (bytes that must move -- fwd: read x, write y;
fwd+bwd: that plus read x and dy, write dx -- over the copy bandwidth of a preallocated tensor copy timed
interleaved with the case), the bytes each keeps for backward, and which backend served normkit. Writes
``benchmarks/results/latest.{json,md,png}``.

    python -m benchmarks                      # the ops and models groups (minutes on 2 cores)
    python -m benchmarks --quick              # float32, contiguous, one shape per op, fewer repeats
    python -m benchmarks --only layer_norm --only rms --mode fwd --providers normkit,torch
    python -m benchmarks --group small --group batch1    # per-call overhead: batch 1, decoding
    python -m benchmarks --group compiled     # torch.compile (compiles each model twice per mode: minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import normkit
from normkit import _native

from .cases import BATCH1_CASES, CASES, COMPILED_CASES, MODEL_CASES, SMALL_CASES, CallCase, Case, ModelCase

PROVIDERS = ("normkit", "normkit-eager", "torch", "onnxruntime")
GROUPS = ("ops", "models", "small", "batch1", "compiled")
GROUP_THREADS = {"small": 1, "batch1": 1}  # the groups' default thread count (--threads sets every group's)
RESULTS = Path(__file__).parent / "results"


# ---- providers ------------------------------------------------------------------------------------------

def _with_backend(name, f):
    def run(x, p):
        _native.set_backend(name)
        try:
            return f(x, p)
        finally:
            _native.set_backend("auto")
    return run


def _ort_forward(case: Case, x: torch.Tensor, p: dict, threads: int):
    """A callable running the op's one-node ONNX model in ONNX Runtime, or a reason string."""
    if case.spec.onnx is None:
        return "no ONNX form"
    if case.dtype != torch.float32:
        return "float32 only"
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        nodes, inits, opset = case.spec.onnx(tuple(x.shape), p, case.spec.eps)
        graph = helper.make_graph(
            nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
            [numpy_helper.from_array(v.float().numpy(), k) for k, v in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = min(model.ir_version, 10)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        xn = np.ascontiguousarray(x.float().numpy()) if case.layout == "contiguous" else x.float().contiguous().numpy()
        sess.run(None, {"x": xn})
    except Exception as exc:  # an op this ONNX Runtime lacks is reported, not fatal
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return lambda: sess.run(None, {"x": xn})


def _timed_callable(mode, f, x, p):
    """A no-argument callable for ``mode``, or a reason string when the provider cannot run the case."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                f(x, p)
        try:
            run()
        except Exception as exc:
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return run
    xg = x.detach().clone().requires_grad_()
    pg = {k: (v.detach().clone().requires_grad_() if k in ("weight", "bias") else v.clone()) for k, v in p.items()}
    dy = torch.randn_like(x)

    def run():
        xg.grad = None
        for v in pg.values():
            v.grad = None
        f(xg, pg).backward(dy)
    try:
        run()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return run


def saved_bytes(f, x, p) -> int | None:
    """Bytes autograd keeps for backward after one training forward (distinct storages)."""
    xg = x.detach().clone().requires_grad_()
    pg = {k: (v.detach().clone().requires_grad_() if k in ("weight", "bias") else v.clone()) for k, v in p.items()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = f(xg, pg)
    except Exception:
        return None
    del y
    return sum(seen.values())


# ---- timing ---------------------------------------------------------------------------------------------

def interleaved(fns: dict, repeat: int, warmup: int, budget_s: float = 0.0, max_rounds: int = 200) -> dict:
    """Time each callable, rotating the order each round; seconds per call, all samples. At least ``repeat``
    rounds, then more until ``budget_s`` seconds have gone by (at most ``max_rounds``): millisecond cases get
    dozens of samples, so their medians stand against the machine's noise (page faults, other tenants)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    keys = list(fns)
    start = time.perf_counter()
    r = 0
    while r < repeat or (time.perf_counter() - start < budget_s and r < max_rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
        r += 1
    return samples


def _median_ms(s):
    return statistics.median(s) * 1e3


def _spread(s):
    if len(s) < 4:
        return float("nan")
    q = statistics.quantiles(s, n=4)
    return (q[2] - q[0]) / statistics.median(s)


def run_case(case: Case, modes, providers, repeat, warmup, threads, budget_s=0.0):
    x = case.make_input()
    p = case.params(x)
    nbytes = x.numel() * x.element_size()
    src = torch.empty(nbytes // 4 or 1)
    dst = torch.empty_like(src)
    makers = {"normkit": _with_backend("auto", case.spec.normkit),
              "normkit-eager": _with_backend("eager", case.spec.normkit),
              "torch": case.spec.torch}
    rows = []
    for mode in modes:
        fns, skipped = {}, {}
        for name in providers:
            if name == "onnxruntime":
                fn = _ort_forward(case, x, p, threads) if mode == "fwd" else "forward only"
            else:
                with _native.recording() as record:
                    fn = _timed_callable(mode, makers[name], x, p)
                if name == "normkit":
                    backend = "; ".join(f"{k}: {v}" for k, v in record.items()) or "—"
            (skipped if isinstance(fn, str) else fns)[name] = fn
        fns["copy"] = lambda: dst.copy_(src)
        samples = interleaved(fns, repeat, warmup, budget_s)
        ms = {k: _median_ms(v) for k, v in samples.items()}
        bw = 2 * nbytes / (ms["copy"] / 1e3)  # bytes read + written per second
        passes = 2 if mode == "fwd" else 5
        floor_ms = passes * nbytes / bw * 1e3
        row = {"case": case.name, "op": case.label or case.op, "shape": list(case.shape), "layout": case.layout,
               "dtype": str(case.dtype).replace("torch.", ""), "mode": mode,
               "ms": {k: round(v, 3) for k, v in ms.items() if k != "copy"},
               "spread": {k: round(_spread(v), 3) for k, v in samples.items()},
               "runs": min(len(v) for v in samples.values()), "skipped": skipped,
               "copy_GBps": round(bw / 1e9, 1), "floor_ms": round(floor_ms, 3),
               "normkit_backend": backend if "normkit" in providers else None}
        if "normkit" in ms:
            row["normkit_GBps"] = round(passes * nbytes / (ms["normkit"] / 1e3) / 1e9, 1)
            row["normkit_x_floor"] = round(ms["normkit"] / floor_ms, 2)
            for other in ("torch", "onnxruntime", "normkit-eager"):
                if other in ms:
                    row[f"normkit/{other}"] = round(ms["normkit"] / ms[other], 3)
        if "torch" in ms:
            row["torch_x_floor"] = round(ms["torch"] / floor_ms, 2)
        if mode != "fwd":
            kept = {k: saved_bytes(makers[k], x, p) for k in ("normkit", "torch", "normkit-eager") if k in providers}
            row["saved_MB"] = {k: round(v / 2**20, 1) for k, v in kept.items() if v is not None}
        rows.append(row)
        _print_row(row)
    return rows


def run_call_case(case: CallCase, providers, repeat, budget_s=0.0):
    """Single calls of a small case, normkit against torch: microseconds per call. Each sample is a loop of as
    many calls as fill about a millisecond (the same count for both providers), interleaved."""
    calls = {k: v for k, v in case.calls().items() if k in providers}
    grad = torch.no_grad() if case.mode == "fwd" else contextlib.nullcontext()  # entered once per loop
    with _native.recording() as record, grad:
        calls["normkit"]()
    backend = "; ".join(f"{k}: {v}" for k, v in record.items()) or "—"
    t0 = time.perf_counter()
    with grad:
        for _ in range(20):
            calls["torch"]()
    per_call = (time.perf_counter() - t0) / 20
    loop = max(1, int(1e-3 / max(per_call, 1e-7)))

    def looped(f):
        def run():
            with (torch.no_grad() if case.mode == "fwd" else contextlib.nullcontext()):
                for _ in range(loop):
                    f()
        return run
    samples = interleaved({k: looped(f) for k, f in calls.items()}, repeat, 2, budget_s, max_rounds=400)
    us = {k: statistics.median(v) / loop * 1e6 for k, v in samples.items()}
    row = {"group": "small", "case": case.name, "op": case.label or case.op, "shape": list(case.shape), "layout": case.layout,
           "dtype": str(case.dtype).replace("torch.", ""), "mode": case.mode, "us": {k: round(v, 2) for k, v in us.items()},
           "ms": {k: round(v / 1e3, 5) for k, v in us.items()}, "calls_per_sample": loop,
           "spread": {k: round(_spread(v), 3) for k, v in samples.items()}, "runs": min(len(v) for v in samples.values()),
           "skipped": {}, "normkit_backend": backend}
    if "normkit" in us and "torch" in us:
        row["normkit/torch"] = round(us["normkit"] / us["torch"], 3)
    _print_row(row)
    return [row]


def run_model_case(case: ModelCase, modes, providers, repeat, warmup, budget_s=0.0, group="models"):
    """The torch model against ``normkit.convert(model)`` (default backend): eval forward and a train step;
    with ``case.compiled`` each under ``torch.compile`` (the first calls compile: their time is reported as
    ``compile_s`` and left out of the samples)."""
    import copy

    torch.manual_seed(0)
    base = case.build()
    models = {}
    if "torch" in providers:
        models["torch"] = copy.deepcopy(base)
    if "normkit" in providers:
        models["normkit"] = normkit.convert(base)
    x = torch.randn(case.shape)
    rows = []
    for mode in modes:
        fns, compile_s = {}, {}
        for name, model in models.items():
            model.train(mode != "eval")
            target = model
            if case.compiled:
                torch._dynamo.reset()
                target = torch.compile(model)
            if mode == "eval":
                def run(target=target):
                    with torch.no_grad():
                        target(x)
            else:
                def run(model=model, target=target):
                    model.zero_grad(set_to_none=True)
                    target(x).float().square().mean().backward()
            if case.compiled:
                t0 = time.perf_counter()
                run()
                compile_s[name] = round(time.perf_counter() - t0, 1)
            fns[name] = run
        samples = interleaved(fns, repeat, warmup, budget_s)
        ms = {k: _median_ms(v) for k, v in samples.items()}
        row = {"group": group, "case": case.name, "op": "model", "shape": list(case.shape), "layout": "contiguous",
               "dtype": "float32", "mode": mode, "ms": {k: round(v, 3) for k, v in ms.items()},
               "spread": {k: round(_spread(v), 3) for k, v in samples.items()},
               "runs": min(len(v) for v in samples.values()), "skipped": {}}
        if compile_s:
            row["compile_s"] = compile_s
        if "normkit" in ms and "torch" in ms:
            row["normkit/torch"] = round(ms["normkit"] / ms["torch"], 3)
        rows.append(row)
        _print_row(row)
    return rows


# ---- output ---------------------------------------------------------------------------------------------

def _fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def _print_row(r):
    unit = "us" if "us" in r else "ms"
    cols = "  ".join(f"{k} {v:7.2f}" for k, v in r[unit].items()) + f" {unit}"
    print(f"{r['case']:<52}{r['mode']:<8} {cols}  | nk/torch {_fmt(r.get('normkit/torch'))}  "
          f"floor x{_fmt(r.get('normkit_x_floor'), '.1f')}  spread {max(r['spread'].values()):.0%}", flush=True)


def markdown(out) -> str:
    lines = [f"Machine: {out['machine']}, torch {out['torch']}, normkit {out['normkit']}, {out['date']}. Threads: "
             f"{out['threads']}. Medians of interleaved runs (at least {out['repeat']}, more until {out.get('budget_s', 0):g} s "
             f"per case and mode, 20/3 of that for whole models, were spent: the runs column); spread = interquartile "
             f"range / median (largest over the providers of the row). Ratios below 1: normkit faster.", ""]
    rows = out["rows"]

    def table(header: str, chosen: list, cells) -> None:
        if chosen:
            lines.extend([header, "|" + "---|" * header.count(" | ") + "---|", *(f"| {' | '.join(cells(r))} |" for r in chosen), ""])

    def ops_cells(r):
        ms, saved = r["ms"], r.get("saved_MB", {})
        return [r["case"], r["mode"], _fmt(ms.get("normkit")), _fmt(ms.get("torch")), _fmt(r.get("normkit/torch")),
                _fmt(r.get("normkit/normkit-eager")), _fmt(r.get("normkit/onnxruntime")),
                f"{_fmt(r.get('normkit_x_floor'), '.1f')}, {_fmt(r.get('torch_x_floor'), '.1f')}",
                f"{saved['normkit']} / {saved['torch']}" if "normkit" in saved and "torch" in saved else "—",
                str(r.get("runs", "—")), f"{max(r['spread'].values()):.0%}", r.get("normkit_backend") or "—"]

    def small_cells(r):
        return [r["case"], r["mode"], _fmt(r["us"].get("normkit")), _fmt(r["us"].get("torch")), _fmt(r.get("normkit/torch")),
                str(r["runs"]), f"{max(r['spread'].values()):.0%}", r.get("normkit_backend") or "—"]

    def model_cells(r):
        cs = r.get("compile_s", {})
        return [r["case"], r["mode"], _fmt(r["ms"].get("normkit"), ".3f"), _fmt(r["ms"].get("torch"), ".3f"),
                _fmt(r.get("normkit/torch"), ".3f"), f"{cs['normkit']}, {cs['torch']}" if "normkit" in cs and "torch" in cs
                else "—", str(r["runs"]), f"{max(r['spread'].values()):.0%}"]

    table("| case | mode | normkit ms | torch ms | normkit / torch | normkit / eager | normkit / ORT | x floor (normkit, torch) "
          "| saved MB (normkit / torch) | runs | spread | normkit backend |",
          [r for r in rows if r.get("group", "ops") == "ops"], ops_cells)
    table("| call (small) | mode | normkit us | torch us | normkit / torch | runs | spread | normkit backend |",
          [r for r in rows if "us" in r], small_cells)
    table("| model | mode | normkit ms | torch ms | normkit / torch | compile s (normkit, torch) | runs | spread |",
          [r for r in rows if r.get("op") == "model"], model_cells)
    return "\n".join(lines)


def plot(out, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in out["rows"] if "normkit/torch" in r or "normkit_x_floor" in r]
    if not rows:
        return
    labels = [f"{r['case']} {r['mode']}" for r in rows]
    ys = range(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, 0.32 * len(rows) + 1.8), sharey=True)
    a1.barh(ys, [r.get("normkit/torch", float("nan")) for r in rows], color="tab:blue", label="normkit / torch")
    a1.scatter([r["ms"]["normkit-eager"] / r["ms"]["torch"] if "torch" in r["ms"] and "normkit-eager" in r["ms"]
                else float("nan") for r in rows], ys,
               marker="|", color="tab:red", s=120, label="normkit eager / torch")
    a1.scatter([r["ms"]["onnxruntime"] / r["ms"]["torch"] if "onnxruntime" in r["ms"] and "torch" in r["ms"] else float("nan")
                for r in rows], ys, marker="x", color="tab:green", label="ONNX Runtime / torch")
    a1.axvline(1.0, color="k", lw=0.8)
    a1.set_xscale("log")
    a1.set_xlabel("time / torch's time (log; < 1 is faster)")
    a1.set_yticks(list(ys), labels, fontsize=7)
    a1.invert_yaxis()
    a1.legend(fontsize=7, loc="lower right")
    a2.barh(ys, [r.get("normkit_x_floor", float("nan")) for r in rows], color="tab:blue", label="normkit")
    a2.scatter([r.get("torch_x_floor", float("nan")) for r in rows], ys, marker="|", color="k", s=120, label="torch")
    a2.axvline(3.0, color="tab:red", lw=0.8, ls="--", label="3x target")
    a2.axvline(1.0, color="k", lw=0.8)
    a2.set_xlabel("time / memory-traffic floor")
    a2.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"normkit benchmarks: {out['machine']}, {out['threads']} threads, torch {out['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def select(args) -> list:
    """The cases of the chosen groups, filtered; ``(group, case)`` pairs."""
    groups = args.group or (["ops"] if args.quick or args.dtype or args.mode else ["ops", "models"])
    chosen = []
    for group in groups:
        cases = {"ops": CASES, "models": MODEL_CASES, "small": SMALL_CASES, "batch1": BATCH1_CASES,
                 "compiled": COMPILED_CASES}[group]
        if group == "ops" and args.quick:
            seen, quick = set(), []
            for c in cases:
                if c.dtype == torch.float32 and c.layout == "contiguous" and c.op not in seen:
                    seen.add(c.op)
                    quick.append(c)
            cases = quick
        if group == "ops" and args.dtype:
            cases = [c for c in cases if str(c.dtype).replace("torch.", "") in args.dtype]
        if args.no_models and group in ("models", "batch1", "compiled"):
            cases = []
        for text in args.only or []:
            cases = [c for c in cases if text in c.name]
        chosen += [(group, c) for c in cases]
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", action="append", choices=GROUPS,
                    help="case groups to run (repeatable; default: ops and models)")
    ap.add_argument("--quick", action="store_true", help="float32, contiguous, one case per op, 5 repeats")
    ap.add_argument("--only", action="append", help="keep cases whose name contains this text (repeatable: all must match)")
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16"])
    ap.add_argument("--mode", action="append", choices=["fwd", "fwd+bwd"])
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, of {PROVIDERS}")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default 2; the small and batch1 groups 1)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per provider (default 9; 5 with --quick)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timing per case and mode: rounds go on past --repeat until it is spent "
                         "(default 3, whole models 20; 0 with --quick)")
    ap.add_argument("--out", default=str(RESULTS), help="directory for latest.json / latest.md / latest.png")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--list", action="store_true", help="list the selected cases and exit")
    ap.add_argument("--no-models", action="store_true", help="skip the whole-model cases")
    args = ap.parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        ap.error(f"unknown provider(s) {unknown}; choose from {PROVIDERS}")
    cases = select(args)
    if args.list:
        print("\n".join(f"{g}: {c.name}" for g, c in cases))
        return 0
    if not cases:
        ap.error("no case matches the filters (see --list)")
    repeat = args.repeat or (5 if args.quick else 9)
    budget = args.budget if args.budget is not None else (0.0 if args.quick else 3.0)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    try:
        status = _native.build()
        build = {"ok": True, "first_call_s": round(time.perf_counter() - t0, 2), "kernels": status["kernels"]}
    except RuntimeError as exc:
        build = {"ok": False, "error": str(exc)[:300]}
    print(f"native kernels: {build}", file=sys.stderr)

    rows, threads = [], {}
    for group, case in cases:
        n = args.threads or GROUP_THREADS.get(group, 2)
        threads[group] = n
        torch.set_num_threads(n)
        if isinstance(case, CallCase):
            rows += run_call_case(case, providers, repeat, budget)
        elif isinstance(case, ModelCase):
            rows += run_model_case(case, list(case.modes), providers, repeat, 1, budget * 20 / 3, group)
        else:
            rows += [{**row, "group": group} for row in
                     run_case(case, args.mode or list(case.modes), providers, repeat, args.warmup, n, budget)]
    out = {"machine": cpu_name(), "threads": ", ".join(f"{g} {n}" for g, n in threads.items()), "torch": torch.__version__,
           "normkit": normkit.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeat": repeat,
           "budget_s": budget, "build": build, "native_status": _native.status(), "rows": rows}
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "latest.json").write_text(json.dumps(out, indent=1))
    (dest / "latest.md").write_text(markdown(out))
    if not args.no_plot:
        plot(out, dest / "latest.png")
    print(f"wrote {dest / 'latest.json'}, latest.md" + ("" if args.no_plot else ", latest.png"))
    return 0
