"""``python -m benchmarks.faults``: what the page faults of fresh outputs cost, for torch and normkit alike.

Both libraries allocate every output anew; glibc serves allocations over 32 MiB (its largest mmap threshold)
with a fresh ``mmap``, so a call writing such an output faults in each of its 4 KiB pages. Per case it times
torch's and normkit's forward (no grad, 2 threads, interleaved, medians) and counts the minor page faults of
each call (``getrusage``), beside two references: ``empty_like(x).fill_(1)`` (a fresh output written once)
and ``fill_(1)`` into a tensor allocated before (the same writes, no faults). Prints a markdown table."""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import normkit.functional as nf


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cases():
    """``(name, torch call, normkit call, x)``: layer norm over 32 MiB of output, batch norm eval under it."""
    out = []
    for shape in [(8192, 1024), (64, 197, 768)]:
        x, w, b = torch.randn(shape), torch.randn(shape[-1]), torch.randn(shape[-1])
        out.append((f"layer_norm {shape}", lambda x=x, w=w, b=b: F.layer_norm(x, x.shape[-1:], w, b),
                    lambda x=x, w=w, b=b: nf.layer_norm(x, x.shape[-1:], w, b), x))
    x = torch.randn(32, 64, 56, 56)
    rm, rv, w, b = torch.randn(64), torch.rand(64) + 0.5, torch.randn(64), torch.randn(64)
    out.append(("batch_norm eval (32, 64, 56, 56)", lambda: F.batch_norm(x, rm, rv, w, b),
                lambda: nf.batch_norm(x, rm, rv, w, b), x))
    return out


def measure(repeat: int = 15) -> list[dict]:
    rows = []
    with torch.no_grad():
        for name, torch_call, normkit_call, x in cases():
            buf = torch.empty_like(x)
            calls = {"torch": torch_call, "normkit": normkit_call,
                     "fresh": lambda x=x: torch.empty_like(x).fill_(1.0), "preallocated": lambda buf=buf: buf.fill_(1.0)}
            for f in calls.values():
                for _ in range(3):
                    f()
            times, faults = {k: [] for k in calls}, {k: [] for k in calls}
            for _ in range(repeat):
                for k, f in calls.items():
                    f0, t0 = _faults(), time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
                    faults[k].append(_faults() - f0)
            rows.append({"case": name, "output_MB": x.numel() * x.element_size() / 1e6,
                         "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
                         "faults": {k: int(statistics.median(v)) for k, v in faults.items()}})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | output MB | torch ms | normkit ms | normkit / torch | faults per call (torch, normkit) | "
             "fresh tensor: empty_like + fill ms (faults) | fill into a preallocated tensor ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, fl = r["ms"], r["faults"]
        lines.append(f"| {r['case']} | {r['output_MB']:.1f} | {ms['torch']:.2f} | {ms['normkit']:.2f} | "
                     f"{ms['normkit'] / ms['torch']:.2f} | {fl['torch']}, {fl['normkit']} | {ms['fresh']:.2f} "
                     f"({fl['fresh']}) | {ms['preallocated']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(markdown(measure(args.repeat)))


if __name__ == "__main__":
    main()
