"""``python -m benchmarks.watch``: what ``normkit.watch`` costs in a training step of the zoo transformer
block (forward, backward, SGD step), watched against unwatched, same weights, same inputs, interleaved in
one process, medians after warm-up. Each step is timed twice: wall clock and the process's CPU time (on a
machine shared with other work the CPU time is the steadier of the two: other processes do not add to it).
Writes ``benchmarks/results/watch.json``; the target is at most 3% of the step."""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch

from normkit import models, watch

import statistics
import time

from .runner import _spread

SHAPES = [(2, 16, 64), (8, 64, 64), (16, 128, 64)]  # (batch, sequence, d_model): the zoo's example first
DEEP = [(8, (2, 16, 64))]  # (blocks, shape): a stack of blocks, whose same-shaped norms the watch measures together


def _step(model, opt, x):
    def run():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    return run


def measure(zoo: str, shape, repeat: int, warmup: int, budget_s: float, every: int = 1, blocks: int = 1) -> dict:
    base = models.get(zoo, seq_len=shape[1]).train()
    if blocks > 1:
        base = torch.nn.Sequential(*[models.get(zoo, seq_len=shape[1]) for _ in range(blocks)]).train()
    plain, watched = base, copy.deepcopy(base)
    w = watch(watched, every=every)
    x = torch.randn(shape)
    fns = {"plain": _step(plain, torch.optim.SGD(plain.parameters(), lr=1e-4), x),
           "watched": _step(watched, torch.optim.SGD(watched.parameters(), lr=1e-4), x)}
    wall, cpu = timed(fns, repeat, warmup, budget_s)
    w.remove()
    med = {k: statistics.median(v) * 1e3 for k, v in {**{f"{k}_wall": v for k, v in wall.items()},
                                                    **{f"{k}_cpu": v for k, v in cpu.items()}}.items()}
    return {"model": zoo, "blocks": blocks, "shape": list(shape), "every": every, "plain_cpu_ms": med["plain_cpu"],
            "watched_cpu_ms": med["watched_cpu"],
            "overhead_cpu_pct": 100.0 * (med["watched_cpu"] / med["plain_cpu"] - 1.0),
            "plain_wall_ms": med["plain_wall"], "watched_wall_ms": med["watched_wall"],
            "overhead_wall_pct": 100.0 * (med["watched_wall"] / med["plain_wall"] - 1.0),
            "spread_cpu": {k: _spread(v) for k, v in cpu.items()}, "samples": len(cpu["plain"]), "layers": len(w.records)}


def timed(fns: dict, repeat: int, warmup: int, budget_s: float):
    """Wall and process-CPU seconds per call of each callable, the order rotating each round: at least
    ``repeat`` rounds, then more until ``budget_s`` seconds have gone by."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    keys, start, r = list(fns), time.perf_counter(), 0
    while r < repeat or time.perf_counter() - start < budget_s:
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - t0)
        r += 1
    return wall, cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.watch", description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget", type=float, default=8.0, help="seconds per case to keep sampling after --repeat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--every", type=int, nargs="+", default=[1, 4, 8], help="watch(every=N) settings to measure (8: the default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "watch.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [(1, shape) for shape in SHAPES] + DEEP
    rows = [measure(zoo, shape, args.repeat, args.warmup, args.budget, every, blocks)
            for zoo in ("transformer_block", "transformer_block_rms") for blocks, shape in cases for every in args.every]
    print(f"{'model':<27} {'input':<14} {'every':>5} {'CPU ms plain':>12} {'watched':>8} {'overhead':>9} {'spread':>10}  "
          f"{'wall ms plain':>13} {'watched':>8} {'overhead':>9}")
    for r in rows:
        spread = "/".join(f"{v:.0%}" for v in r["spread_cpu"].values())
        name = r["model"] + (f" x{r['blocks']}" if r["blocks"] > 1 else "")
        print(f"{name:<27} {str(tuple(r['shape'])):<14} {r['every']:>5} {r['plain_cpu_ms']:>12.3f} {r['watched_cpu_ms']:>8.3f} "
              f"{r['overhead_cpu_pct']:>8.1f}% {spread:>10}  {r['plain_wall_ms']:>13.3f} {r['watched_wall_ms']:>8.3f} "
              f"{r['overhead_wall_pct']:>8.1f}%")
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "threads": args.threads,
                                          "machine": platform.processor() or platform.machine(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
