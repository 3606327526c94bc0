"""Multi-process test harness: spawn real processes on CPU, gloo backend, ``file://`` rendezvous in a temp dir.

:func:`launch` starts ``world_size`` processes that each run ``target(rank, world_size, *args)`` inside an
initialized default process group, and returns what each returned (or the error it raised, as a string).
Processes are joined with a deadline and killed after it, so a hang fails the test instead of blocking it.
The workers and the data they share with the parent's references live here, so that the spawned
children can import them.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.fx
import torch.multiprocessing as mp

# ------------------------------------------------------------------------------------------- launcher


def _child(rank, world_size, init_file, timeout_s, target, args, out_path, final_barrier, backend):
    torch.set_num_threads(1)
    result = None
    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = {"ok": target(rank, world_size, *args)}
    except BaseException as exc:  # reported to the parent, which fails the test with the traceback
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    torch.save(result, out_path)
    if final_barrier and "error" not in result:
        try:
            dist.barrier()  # nobody leaves while a peer may still be reading from it
        except Exception:
            pass
    os._exit(0)  # no atexit handlers or process-group teardown: a broken group must not hang the exit


def launch(world_size, target, args=(), tmp_path=None, timeout_s=30.0, deadline_s=120.0, wait_for=None, backend="gloo"):
    """Run ``target`` on ``world_size`` spawned ranks; returns a list of per-rank dicts, each
    ``{"ok": value}``, ``{"error": message, "traceback": ...}`` or ``{"missing": exitcode}``.

    ``timeout_s`` is the process group's timeout. The ranks in ``wait_for`` (default: all) are joined
    until ``deadline_s``; then every rank still running is killed (so a hang fails instead of blocking)."""
    ctx = mp.get_context("spawn")
    init_file = os.path.join(str(tmp_path), f"rendezvous-{time.monotonic_ns()}")
    outs = [os.path.join(str(tmp_path), f"rank{r}-{time.monotonic_ns()}.pt") for r in range(world_size)]
    procs = [ctx.Process(target=_child, args=(r, world_size, init_file, timeout_s, target, args, outs[r], wait_for is None, backend),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for r in (range(world_size) if wait_for is None else wait_for):
        procs[r].join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for p, out in zip(procs, outs):
        results.append(torch.load(out, weights_only=False) if os.path.exists(out) else {"missing": p.exitcode})
    return results


def ok(results):
    """The per-rank values, failing with every rank's error if any rank did not succeed."""
    bad = [(r, res) for r, res in enumerate(results) if "ok" not in res]
    if bad:
        raise AssertionError("ranks failed:\n" + "\n".join(f"rank {r}: {res.get('traceback', res)}" for r, res in bad))
    return [res["ok"] for res in results]


# ------------------------------------------------------------------------------------------- cases
# Every case: a (C, *spatial) layout, per-rank batch sizes by world size, dtype, offset/scale of the data,
# momentum, affine, memory format. Two training steps (different data), then one eval step.

CASES = {
    # float64, uneven ranks, primes
    "f64": dict(dtype=torch.float64, C=3, spatial=(5, 2), sizes={2: [3, 5], 3: [2, 4, 3]}, momentum=0.1),
    # momentum=None: the cumulative average; no affine; 1-D spatial
    "f64_cma": dict(dtype=torch.float64, C=4, spatial=(7,), sizes={2: [4, 1], 3: [1, 2, 2]}, momentum=None, affine=False),
    # an empty rank (it still joins every collective)
    "f64_empty": dict(dtype=torch.float64, C=2, spatial=(3, 3), sizes={2: [0, 4], 3: [3, 0, 2]}, momentum=0.1),
    # (N, C) input
    "f64_2d": dict(dtype=torch.float64, C=5, spatial=(), sizes={2: [2, 3], 3: [2, 1, 3]}, momentum=0.3),
    "f64_channels_last": dict(dtype=torch.float64, C=3, spatial=(3, 4), sizes={2: [2, 3]}, momentum=0.1, channels_last=True),
    # float32 at a mean offset of 1e7 over unit noise, and at magnitude 1e30 (sum of squares overflows float32)
    "f32_offset": dict(dtype=torch.float32, C=3, spatial=(4, 3), sizes={2: [3, 2], 3: [2, 2, 3]}, momentum=0.1, offset=1e7),
    "f32_huge": dict(dtype=torch.float32, C=3, spatial=(4, 3), sizes={2: [2, 3], 3: [3, 1, 2]}, momentum=0.1, scale=1e30),
    "f32_huge_offset": dict(dtype=torch.float32, C=2, spatial=(5,), sizes={2: [3, 3]}, momentum=0.1, scale=1e30, offset=1e37),
    # an empty rank at the offset, and a constant channel at the offset (variance exactly 0 on every rank)
    "f32_offset_empty": dict(dtype=torch.float32, C=2, spatial=(6,), sizes={2: [0, 5], 3: [2, 0, 4]}, momentum=0.1, offset=1e7),
    "f32_constant": dict(dtype=torch.float32, C=2, spatial=(3,), sizes={2: [2, 3], 3: [1, 2, 2]}, momentum=0.1, offset=1e7, scale=0.0),
    "f16": dict(dtype=torch.float16, C=3, spatial=(4, 3), sizes={2: [3, 2]}, momentum=0.1, offset=300.0),
    "bf16": dict(dtype=torch.bfloat16, C=3, spatial=(4, 3), sizes={2: [2, 3]}, momentum=0.1, scale=1e30),
    # through torch.fx graphs (one traced in training mode, one in eval): they synchronize as the module does
    "f64_fx": dict(dtype=torch.float64, C=3, spatial=(4,), sizes={2: [2, 3]}, momentum=None, fx=True),
}


def param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def case_data(name):
    """Per case, deterministic: ``weight``, ``bias`` and, per step (two training, one eval), the full
    batch ``x`` and upstream gradient ``dy`` for the largest world of the case (smaller worlds use a prefix)."""
    spec = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    n = max(sum(s) for s in spec["sizes"].values())
    shape = (n, spec["C"], *spec["spatial"])
    steps = []
    for _ in range(3):
        x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * spec.get("scale", 1.0) + spec.get("offset", 0.0)
        x64 = x64 + torch.arange(spec["C"], dtype=torch.float64).view(1, -1, *([1] * len(spec["spatial"]))) * spec.get("scale", 1.0)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        steps.append((x64.to(spec["dtype"]), dy.to(spec["dtype"])))
    pd = param_dtype(spec["dtype"])
    weight = (torch.rand(spec["C"], generator=gen, dtype=torch.float64) + 0.5).to(pd)
    bias = torch.randn(spec["C"], generator=gen, dtype=torch.float64).to(pd)
    return weight, bias, steps


def rank_slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


class CollectiveCounter:
    """Counts the collectives this process issues (by wrapping torch.distributed's functions)."""

    NAMES = ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "reduce_scatter", "all_to_all")

    def __init__(self):
        self.count = 0
        for n in self.NAMES:
            original = getattr(dist, n)

            def wrapped(*a, _original=original, **k):
                self.count += 1
                return _original(*a, **k)

            setattr(dist, n, wrapped)

    def take(self):
        c, self.count = self.count, 0
        return c


def run_case(name, rank, world_size, counter, group=None, sizes=None):
    """One rank of one case: two training steps, then eval; returns what the parent compares."""
    import normkit.nn as nnk

    spec = CASES[name]
    sizes = sizes or spec["sizes"][world_size]
    weight, bias, steps = case_data(name)
    m = nnk.SyncBatchNorm(spec["C"], momentum=spec["momentum"], affine=spec.get("affine", True), process_group=group,
                          dtype=param_dtype(spec["dtype"]))
    m.layer_name = name
    if m.affine:
        with torch.no_grad():
            m.weight.copy_(weight)
            m.bias.copy_(bias)
    out = {"steps": [], "collectives_train": []}
    sl = rank_slice(sizes, rank)
    forward = torch.fx.symbolic_trace(m) if spec.get("fx") else m  # (the graph shares m's parameters and buffers)
    for x_full, dy_full in steps[:2]:
        x = x_full[sl].clone()
        if spec.get("channels_last"):
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        counter.take()
        y = forward(x)
        y.backward(dy_full[sl])
        out["collectives_train"].append(counter.take())
        rec = {"y": y.detach(), "dx": x.grad, "y_channels_last": y.is_contiguous(memory_format=torch.channels_last)}
        if m.affine:
            rec["dweight"], rec["dbias"] = m.weight.grad.clone(), m.bias.grad.clone()
            m.weight.grad, m.bias.grad = None, None
        out["steps"].append(rec)
    out["running_mean"], out["running_var"] = m.running_mean.clone(), m.running_var.clone()
    out["num_batches_tracked"] = int(m.num_batches_tracked)
    m.eval()
    forward = torch.fx.symbolic_trace(m) if spec.get("fx") else m
    counter.take()
    with torch.no_grad():
        out["eval_y"] = forward(steps[2][0][sl])
    out["collectives_eval"] = counter.take()
    return out


def world_worker(rank, world_size, names, edge=True, ddp=False):
    """Everything one world checks, in one launch (starting processes is the slow part): the named
    cases, the edge cases, and the DDP run."""
    counter = CollectiveCounter()
    out = {"cases": {name: run_case(name, rank, world_size, counter) for name in names}}
    if edge:
        out["edge"] = edge_worker(rank, world_size, counter)
    if ddp:
        out["ddp"] = ddp_worker(rank, world_size)
    return out


# ------------------------------------------------------------------------------------------- edge cases


def one_each_dy(rank):
    return torch.tensor([[1.0 + rank * rank, -2.0 * rank, 0.5]], dtype=torch.float64)


PAIR_CASES = [("f64", [2, 3]), ("f64_cma", [3, 1])]


def edge_worker(rank, world_size, counter):
    """Errors that every rank must raise, an all-empty group, track_running_stats=False in eval; with 4
    ranks also process-group subsets and groups of one."""
    import normkit.nn as nnk

    out = {}
    # one value per channel over the whole group (rank 0 has it, the others are empty)
    m = nnk.SyncBatchNorm(3, dtype=torch.float64)
    m.layer_name = "net.bn"
    x = torch.randn(1 if rank == 0 else 0, 3, dtype=torch.float64)
    try:
        m(x)
        out["one_value"] = None
    except ValueError as exc:
        out["one_value"] = str(exc)
    # two values over the group, one per rank: fine (torch's rule is about the global batch)
    x = torch.full((1, 3), float(rank), dtype=torch.float64, requires_grad=True)
    y = m(x)
    y.backward(one_each_dy(rank))
    out["one_each_y"], out["one_each_dx"] = y.detach(), x.grad
    # double backward: refused with torch's once_differentiable error, on every rank
    m = nnk.SyncBatchNorm(2, dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((m(x) ** 3).sum(), x, create_graph=True)
    try:
        g.sum().backward()
        out["double_backward"] = None
    except RuntimeError as exc:
        out["double_backward"] = str(exc)
    # the whole group's batch is empty: empty output, buffers untouched, zero gradients
    m = nnk.SyncBatchNorm(2, dtype=torch.float64)
    x = torch.zeros(0, 2, 3, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y.sum().backward()
    out["all_empty"] = (tuple(y.shape), m.running_mean.clone(), m.running_var.clone(), x.grad.shape,
                        None if m.weight.grad is None else m.weight.grad.clone())
    # track_running_stats=False: batch statistics in eval too, and nothing communicated there
    m = nnk.SyncBatchNorm(2, track_running_stats=False, dtype=torch.float64).eval()
    x = torch.randn(3, 2, 4, dtype=torch.float64) + rank
    counter.take()
    y = m(x)
    out["untracked_eval"] = (counter.take(), y, nnk.BatchNorm1d(2, track_running_stats=False, dtype=torch.float64).eval()(x))
    # a process group of one and subsets of the world: groups {0, 1} and {2, 3} (every rank creates every group)
    if world_size == 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        singles = [dist.new_group([r]) for r in range(world_size)]
        # the two pairs run different cases (different data, C and sizes): any cross-talk fails or hangs
        out["pair"] = run_case(PAIR_CASES[rank // 2][0], rank % 2, 2, counter, group=pairs[rank // 2], sizes=PAIR_CASES[rank // 2][1])
        # a group of one: exactly normkit's BatchNorm on the local batch, nothing communicated
        torch.manual_seed(rank)
        x = torch.randn(3, 2, 5, dtype=torch.float64)
        sbn, bn = nnk.SyncBatchNorm(2, process_group=singles[rank], dtype=torch.float64), nnk.BatchNorm1d(2, dtype=torch.float64)
        counter.take()
        same = torch.equal(sbn(x), bn(x))
        out["single"] = (same, counter.take(), torch.equal(sbn.running_var, bn.running_var))
    return out


# ------------------------------------------------------------------------------------------- faults


def fault_worker(rank, world_size, mode):
    """Rank 1 dies (``mode="die"``) or stalls (``"stall"``) before the second step; rank 0 reports what its
    second step raised and how long it took."""
    import normkit.nn as nnk

    from collections import OrderedDict

    model = torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(4, 3), bn=torch.nn.BatchNorm1d(3), head=torch.nn.Linear(3, 2)))
    model = nnk.SyncBatchNorm.convert_sync_batchnorm(model)  # names the layer "bn"
    x = torch.randn(4, 4)
    model(x).sum().backward()  # a healthy first step
    if rank == 1:
        if mode == "die":
            os._exit(3)
        time.sleep(60)  # stalled: the parent kills it
        return None
    start = time.monotonic()
    try:
        model(x).sum().backward()
        return {"error": None, "elapsed": time.monotonic() - start}
    except RuntimeError as exc:
        return {"error": str(exc), "type": type(exc).__name__, "elapsed": time.monotonic() - start}


# ------------------------------------------------------------------------------------------- DDP


def tiny_model(seed=0):
    """Conv -> BatchNorm2d -> ReLU -> pool -> Linear -> BatchNorm1d -> Linear, float64."""
    import normkit.nn as nnk

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), nnk.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16, 6), nnk.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3),
    ).double()


def ddp_data(steps=2, n=10):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for _ in range(steps)]


DDP_SIZES = [4, 6]  # uneven on purpose


def ddp_loss(out, target, global_n, world_size):
    """Sum of the local losses scaled so that DDP's gradient average is the full batch's mean loss."""
    return torch.nn.functional.cross_entropy(out, target, reduction="sum") * (world_size / global_n)


def ddp_worker(rank, world_size):
    import normkit.nn as nnk
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(nnk.SyncBatchNorm.convert_sync_batchnorm(tiny_model()))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sl = rank_slice(DDP_SIZES, rank)
    for x, t in ddp_data():
        opt.zero_grad()
        ddp_loss(model(x[sl]), t[sl], len(t), world_size).backward()
        opt.step()
    return {k: v.clone() for k, v in model.module.state_dict().items()}


# ------------------------------------------------------------------------------------------- conformance

CONFORMANCE_SHAPE = (4, 6, 5, 3)


def conformance_worker(rank, world_size):
    """Every conformance case of synchronized batch norm (``normkit.check.cases.conformance_cases`` for the
    op ``batch_norm``, every dtype), each rank on its half of the batch: this rank's y, dx and parameter
    gradients per (dtype, case index). The parent draws the same data (``Case.data``) and judges."""
    from normkit.check.cases import conformance_cases
    from normkit.ops.sync_batch_norm import sync_batch_norm

    out = {}
    n = CONFORMANCE_SHAPE[0]
    sizes = [n] if world_size == 1 else [n // 2, n - n // 2]
    sl = rank_slice(sizes, rank)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for i, case in enumerate(conformance_cases(dtype, ["batch_norm"])):
            x, p, dy = case.data(CONFORMANCE_SHAPE, seed=i)
            xg = x[sl].clone().requires_grad_()
            # float32 parameters for half inputs (as mixed precision keeps them): each rank's parameter gradient
            # is its own part, and a half partial sum could overflow where the sum over the ranks does not
            pd = param_dtype(dtype)
            w, b = (p[k].to(pd).requires_grad_() for k in ("weight", "bias"))
            rm, rv = torch.zeros(x.shape[1], dtype=pd), torch.ones(x.shape[1], dtype=pd)  # updated in place
            eps = case.op.eps_or_default(case.eps)
            y = sync_batch_norm(xg, rm, rv, w, b, 0.1, eps, dist.group.WORLD, f"conformance {i}")
            y.backward(dy[sl])
            out[(str(dtype), i)] = {"y": y.detach(), "dx": xg.grad, "dweight": w.grad, "dbias": b.grad}
    return out
