"""normkit benchmarks: median time of normkit and torch on the same inputs, in the same process.

Reports, per case, the medians after warm-up, the ratio torch / normkit (above 1: normkit is faster) and
the multiple of the memory-traffic floor (bytes that must move, over copy bandwidth measured in this run
into a preallocated buffer). Writes JSON to benchmarks/results/latest.json.

    python benchmarks/run.py [--threads 2] [--repeat 7] [--only lrn]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import normkit
import normkit.functional as nf


def median_ms(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def fwd(f, x):
    def run():
        with torch.no_grad():
            f(x)
    return run


def fwd_bwd(f, x):
    xg = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)

    def run():
        xg.grad = None
        f(xg).backward(dy)
    return run


ALEXNET_CONV1 = (32, 96, 55, 55)
CASES = [
    # name, shape, torch op, normkit op, passes over the data that cannot be avoided (fwd; fwd+bwd)
    ("lrn alexnet-conv1 size=5", ALEXNET_CONV1, lambda x: F.local_response_norm(x, 5, 1e-4, 0.75, 2.0),
     lambda x: nf.local_response_norm(x, 5, 1e-4, 0.75, 2.0), (2, 5)),
    ("layer_norm (64, 197, 768)", (64, 197, 768), lambda x: F.layer_norm(x, (768,)), lambda x: nf.layer_norm(x, (768,)), (2, 5)),
    ("batch_norm train (32, 64, 56, 56)", (32, 64, 56, 56), lambda x: F.batch_norm(x, None, None, training=True),
     lambda x: nf.batch_norm(x, None, None, training=True), (2, 5)),
    ("group_norm 32 groups (16, 128, 32, 32)", (16, 128, 32, 32), lambda x: F.group_norm(x, 32), lambda x: nf.group_norm(x, 32), (2, 5)),
    ("rms_norm (64, 197, 768)", (64, 197, 768), lambda x: F.rms_norm(x, (768,)), lambda x: nf.rms_norm(x, (768,)), (2, 5)),
]


def copy_bandwidth(nbytes, repeat):
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeat)
    return 2 * nbytes / (ms / 1e3)  # bytes read + written per second


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name, shape, t_op, n_op, passes in CASES:
        if args.only not in name:
            continue
        x = torch.randn(shape) * 3
        bw = copy_bandwidth(x.numel() * 4, args.repeat)
        for mode, make, n_pass in (("fwd", fwd, passes[0]), ("fwd+bwd", fwd_bwd, passes[1])):
            t = median_ms(make(t_op, x), max(3, args.repeat // 2))
            n = median_ms(make(n_op, x), args.repeat)
            floor_ms = n_pass * x.numel() * 4 / bw * 1e3
            rows.append({"case": name, "mode": mode, "torch_ms": round(t, 2), "normkit_ms": round(n, 2),
                         "speedup": round(t / n, 2), "normkit_x_floor": round(n / floor_ms, 1)})
            print(f"{name:<40}{mode:<9} torch {t:8.1f} ms  normkit {n:8.1f} ms  speedup {t / n:5.2f}x  "
                  f"({n / floor_ms:4.1f}x the traffic floor)", flush=True)
    out = {"machine": cpu_name(), "threads": args.threads, "torch": torch.__version__,
           "normkit": normkit.__version__, "rows": rows}
    path = Path(__file__).parent / "results" / "latest.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
