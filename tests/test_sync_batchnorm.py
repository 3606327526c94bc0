"""normkit.nn.SyncBatchNorm: real processes (spawned, CPU, gloo, file:// rendezvous in a temp dir) against
single-process batch norm on the concatenated batch.

Starting processes is the slow part, so each world size is launched once (module-scoped fixtures) and
runs every case; the tests below then check one case each. References: torch's own ``nn.BatchNormNd`` in
float64 for the float64 cases (to 1e-9), the extended-precision oracle (``tests/oracle.py``) for float32
at a 1e7 offset / 1e30 magnitude and for half precision (the core's tolerance, ``REL_TOL``).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import _dist
import normkit
import normkit.nn as nnk
import oracle
from conftest import REL_TOL, assert_rel_close

# float64 against torch's float64 BatchNorm: both are exact to a few ulps, so far tighter than the contract
F64_TOL = 1e-9
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- worlds


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _dist.ok(_dist.launch(2, _dist.world_worker, (list(_dist.CASES), True, True), tmp_path_factory.mktemp("w2")))


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    names = [n for n, spec in _dist.CASES.items() if 3 in spec["sizes"]]
    return _dist.ok(_dist.launch(3, _dist.world_worker, (names, True, False), tmp_path_factory.mktemp("w3")))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _dist.ok(_dist.launch(4, _dist.world_worker, ([], True, False), tmp_path_factory.mktemp("w4")))


# ------------------------------------------------------------------------------------------- references


def torch_reference(name, sizes):
    """Single-process torch BatchNorm (float64) on the concatenated batch: two training steps, eval."""
    spec = _dist.CASES[name]
    weight, bias, steps = _dist.case_data(name)
    n = sum(sizes)
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[2 + len(spec["spatial"])]
    bn = cls(spec["C"], momentum=spec["momentum"], affine=spec.get("affine", True), dtype=torch.float64)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    ref = {"steps": []}
    for x, dy in steps[:2]:
        x = x[:n].double().requires_grad_()
        y = bn(x)
        y.backward(dy[:n].double())
        rec = {"y": y.detach(), "dx": x.grad}
        if bn.affine:
            rec["dweight"], rec["dbias"] = bn.weight.grad.clone(), bn.bias.grad.clone()
            bn.weight.grad = bn.bias.grad = None
        ref["steps"].append(rec)
    ref["running_mean"], ref["running_var"] = bn.running_mean, bn.running_var
    bn.eval()
    ref["eval_y"] = bn(steps[2][0][:n].double()).detach()
    return ref


def oracle_reference(name, sizes, running):
    """The extended-precision oracle on the concatenated (rounded) batch; eval uses ``running`` (the
    buffers normkit stored) so that only the eval computation itself is compared."""
    spec = _dist.CASES[name]
    weight, bias, steps = _dist.case_data(name)
    n, m = sum(sizes), spec["momentum"]
    w, b = oracle.ld(weight), oracle.ld(bias)
    rm, rv = np.zeros(spec["C"], dtype=oracle.LD), np.ones(spec["C"], dtype=oracle.LD)
    ref = {"steps": []}
    for x, dy in steps[:2]:
        xl = oracle.ld(x[:n])
        ref["steps"].append(oracle.batch_norm(xl, w, b, oracle.ld(dy[:n]), spec.get("eps", 1e-5)))
        axes = (0, *range(2, xl.ndim))
        mean = xl.mean(axis=axes)
        var = ((xl - mean.reshape(1, -1, *([1] * (xl.ndim - 2)))) ** 2).sum(axis=axes) / (xl.size // spec["C"] - 1)
        rm, rv = (1 - m) * rm + m * mean, (1 - m) * rv + m * var
    ref["running_mean"], ref["running_var"] = rm, rv
    ref["eval_y"] = oracle.batch_norm(oracle.ld(steps[2][0][:n]), w, b, None, 1e-5, oracle.ld(running[0]), oracle.ld(running[1]))["y"]
    return ref


def check_case(name, per_rank, sizes):
    """Concatenated outputs and input grads, summed parameter grads, and every rank's running buffers
    against single-process batch norm on the concatenated batch."""
    spec = _dist.CASES[name]
    dtype = spec["dtype"]
    if dtype == torch.float64:
        ref, rel = torch_reference(name, sizes), F64_TOL
    else:
        ref, rel = oracle_reference(name, sizes, (per_rank[0]["running_mean"], per_rank[0]["running_var"])), REL_TOL[dtype]
    for step, rstep in enumerate(ref["steps"]):
        got = [r["steps"][step] for r in per_rank]
        for key in ("y", "dx"):
            out = torch.cat([g[key] for g in got])
            assert out.dtype == dtype
            assert_rel_close(out, rstep[key], dtype, f"{name} step {step} {key}", rel=rel)
        for key in ("dweight", "dbias"):
            if key in rstep:
                assert_rel_close(sum(g[key] for g in got), rstep[key], dtype, f"{name} step {step} summed {key}", rel=rel)
        if spec.get("channels_last"):
            assert all(g["y_channels_last"] for g in got if g["y"].numel()), "channels_last input, output not channels_last"
    for key in ("running_mean", "running_var"):
        for r, res in enumerate(per_rank):
            assert torch.equal(res[key], per_rank[0][key]), f"{name}: {key} differs between rank 0 and rank {r}"
        assert_rel_close(per_rank[0][key], ref[key], dtype, f"{name} {key}", rel=rel)
    assert all(r["num_batches_tracked"] == 2 for r in per_rank)
    assert_rel_close(torch.cat([r["eval_y"] for r in per_rank]), ref["eval_y"], dtype, f"{name} eval output", rel=rel)
    # one collective forward and one backward per step; none in eval
    assert all(r["collectives_train"] == [2, 2] and r["collectives_eval"] == 0 for r in per_rank), \
        [(r["collectives_train"], r["collectives_eval"]) for r in per_rank]


# ------------------------------------------------------------------------------------------- 2 and 3 ranks


@pytest.mark.parametrize("name", list(_dist.CASES))
def test_two_ranks_equal_single_process(world2, name):
    check_case(name, [r["cases"][name] for r in world2], _dist.CASES[name]["sizes"][2])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, spec in _dist.CASES.items() if 3 in spec["sizes"]])
def test_three_ranks_equal_single_process(world3, name):
    check_case(name, [r["cases"][name] for r in world3], _dist.CASES[name]["sizes"][3])


WORLDS = ["world2", pytest.param("world3", marks=pytest.mark.slow)]


@pytest.mark.parametrize("world_name", WORLDS)
def test_one_value_per_channel_over_the_group_raises_on_every_rank(request, world_name):
    world = request.getfixturevalue(world_name)
    for r, res in enumerate(world):
        msg = res["edge"]["one_value"]
        assert msg is not None, f"rank {r} did not raise"
        assert "Expected more than 1 value per channel when training" in msg and "'net.bn'" in msg, msg


@pytest.mark.parametrize("world_name", WORLDS)
def test_one_value_on_each_rank_is_enough(request, world_name):
    """torch's rule is about the global batch: one value on each of two or more ranks normalizes."""
    world = request.getfixturevalue(world_name)
    x = torch.tensor([[float(r)] * 3 for r in range(len(world))], dtype=torch.float64, requires_grad=True)
    bn = nn.BatchNorm1d(3, dtype=torch.float64)
    y = bn(x)
    y.backward(torch.cat([_dist.one_each_dy(r) for r in range(len(world))]))
    assert_rel_close(torch.cat([r["edge"]["one_each_y"] for r in world]), y, torch.float64, "y", rel=F64_TOL)
    assert_rel_close(torch.cat([r["edge"]["one_each_dx"] for r in world]), x.grad, torch.float64, "dx", rel=F64_TOL)


def test_double_backward_raises(world2):
    for res in world2:
        assert res["edge"]["double_backward"] is not None and "once_differentiable" in res["edge"]["double_backward"]


def test_empty_group_batch(world2):
    for res in world2:
        shape, rm, rv, grad_shape, wgrad = res["edge"]["all_empty"]
        assert shape == (0, 2, 3) and grad_shape == (0, 2, 3)
        assert torch.equal(rm, torch.zeros(2, dtype=torch.float64)) and torch.equal(rv, torch.ones(2, dtype=torch.float64))
        assert wgrad is None or not wgrad.any()


def test_untracked_eval_uses_local_batch_and_communicates_nothing(world2):
    for res in world2:
        collectives, y, bn_y = res["edge"]["untracked_eval"]
        assert collectives == 0 and torch.equal(y, bn_y)


# ------------------------------------------------------------------------------------------- 4 ranks: groups


@pytest.mark.slow
def test_process_group_subsets_synchronize_separately(world4):
    for pair, (name, sizes) in enumerate(_dist.PAIR_CASES):
        check_case(name, [world4[2 * pair + i]["edge"]["pair"] for i in range(2)], sizes)


@pytest.mark.slow
def test_group_of_one_is_batchnorm_and_silent(world4):
    for r, res in enumerate(world4):
        same, collectives, same_running = res["edge"]["single"]
        assert same and same_running and collectives == 0, (r, res["edge"]["single"])


# ------------------------------------------------------------------------------------------- DDP


def test_two_ddp_steps_equal_single_process_full_batch(world2):
    model = _dist.tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, t in _dist.ddp_data():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), t).backward()
        opt.step()
    ref = model.state_dict()
    for r, res in enumerate(world2):
        got = res["ddp"]
        assert list(got) == list(ref)
        for key, value in ref.items():
            assert torch.equal(got[key], world2[0]["ddp"][key]), f"{key} differs between ranks 0 and {r}"
            if value.is_floating_point():
                assert_rel_close(got[key], value, torch.float64, f"rank {r} {key} after 2 DDP steps", rel=F64_TOL)
            else:
                assert torch.equal(got[key], value), key


# ------------------------------------------------------------------------------------------- faults


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["die", "stall"])
def test_dead_or_stalled_peer_raises_naming_the_layer(tmp_path, mode):
    timeout = 4.0
    res = _dist.launch(2, _dist.fault_worker, (mode,), tmp_path, timeout_s=timeout, deadline_s=60.0, wait_for=[0])
    assert "ok" in res[0], res[0]
    out = res[0]["ok"]
    assert out["error"] is not None, "the survivor finished a step without its peer"
    assert out["type"] == "RuntimeError" and "SyncBatchNorm layer 'bn'" in out["error"], out["error"]
    assert out["elapsed"] < timeout + 10.0, f"took {out['elapsed']:.1f} s with a {timeout} s process-group timeout"


# ------------------------------------------------------------------------------------------- single process


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nnk.BatchNorm2d(4))
        self.bn3 = nn.BatchNorm3d(2)
        self.head = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=None), nn.Linear(5, 2, bias=False))

    def forward(self, x):
        h = self.features(x)
        h = h + self.bn3(h.view(h.shape[0], 2, 2, *h.shape[2:])).view_as(h)
        return self.head(h.mean(dim=(2, 3)))


def test_convert_sync_batchnorm_and_back():
    torch.manual_seed(0)
    model = Net()
    model.head[1].eval()
    params = {n: p for n, p in model.named_parameters()}
    synced = nnk.SyncBatchNorm.convert_sync_batchnorm(model)
    names = [n for n, m in synced.named_modules() if isinstance(m, nnk.SyncBatchNorm)]
    assert names == ["features.1", "features.3", "bn3", "head.1"]
    assert all(synced.get_submodule(n).layer_name == n for n in names)
    assert not synced.head[1].training and synced.features[1].training
    assert synced.head[1].momentum is None
    assert all(p is params[n] for n, p in synced.named_parameters()), "parameters must be shared, not copied"
    # torch.distributed is not initialized here: exactly batch norm
    ref = copy_of(Net)
    x = torch.randn(3, 3, 6, 6)
    assert torch.equal(synced(x), ref(x))
    for n in names:
        assert torch.equal(synced.get_submodule(n).running_var, ref.get_submodule(n).running_var)
    back = nnk.SyncBatchNorm.revert_sync_batchnorm(synced)
    kinds = {n: type(back.get_submodule(n)) for n in names}
    assert kinds == {"features.1": nnk.BatchNorm2d, "features.3": nnk.BatchNorm2d, "bn3": nnk.BatchNorm3d, "head.1": nnk.BatchNorm1d}
    assert not back.head[1].training
    assert torch.equal(back(x), ref(x))
    torch_back = normkit.revert(back)
    assert type(torch_back.bn3) is nn.BatchNorm3d
    assert torch_back.state_dict().keys() == Net().state_dict().keys()


def copy_of(cls):
    torch.manual_seed(0)
    model = normkit.convert(cls())
    model.head[1].eval()
    return model


def test_revert_picks_the_rank_from_dim_or_the_last_input():
    m = nnk.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="pass dim=1, 2 or 3"):
        nnk.SyncBatchNorm.revert_sync_batchnorm(nn.Sequential(m))
    assert type(nnk.SyncBatchNorm.revert_sync_batchnorm(m, dim=3)) is nnk.BatchNorm3d
    m(torch.randn(2, 3, 4, 4))
    assert type(nnk.SyncBatchNorm.revert_sync_batchnorm(m)) is nnk.BatchNorm2d
    assert type(nnk.SyncBatchNorm.revert_sync_batchnorm(nn.SyncBatchNorm(3), dim=1)) is nnk.BatchNorm1d
    with pytest.raises(ValueError, match="dim must be"):
        nnk.SyncBatchNorm.revert_sync_batchnorm(m, dim=4)


def test_state_dict_repr_and_checkpoints_are_torchs():
    no_bias = {"bias": False} if "bias" in inspect.signature(nn.SyncBatchNorm).parameters else {}  # torch >= 2.13
    ours, theirs = nnk.SyncBatchNorm(4, momentum=0.2, **no_bias), nn.SyncBatchNorm(4, momentum=0.2, **no_bias)
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm) and not isinstance(ours, nn.SyncBatchNorm)
    torch.manual_seed(1)
    for src in (nn.SyncBatchNorm(4), nn.BatchNorm2d(4), nnk.BatchNorm1d(4)):
        with torch.no_grad():
            src.running_mean.normal_()
            src.num_batches_tracked.fill_(7)
        dst = nnk.SyncBatchNorm(4)
        dst.load_state_dict(src.state_dict(), strict=True)
        assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))
        nn.SyncBatchNorm(4).load_state_dict(dst.state_dict(), strict=True)
    # a version-1 checkpoint (before num_batches_tracked): torch's _version migration fills it in
    old = nn.BatchNorm2d(4).state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    m = nnk.SyncBatchNorm(4)
    m.load_state_dict(old, strict=True)
    assert m.num_batches_tracked.dtype == torch.long and int(m.num_batches_tracked) == 0


def test_normkit_convert_maps_torch_syncbatchnorm():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.SyncBatchNorm(2, process_group=None))
    converted, report = normkit.convert(model, return_report=True)
    assert type(converted[1]) is nnk.SyncBatchNorm and report[0].changed and report[0].after == "normkit.nn.SyncBatchNorm"
    x = torch.randn(4, 2, 3, 3)
    assert torch.equal(converted(x), nnk.BatchNorm2d(2)(converted[0](x)))  # not initialized: batch norm
    back = normkit.revert(converted)
    assert type(back[1]) is nn.SyncBatchNorm


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_distributed_is_exactly_batchnorm(momentum):
    torch.manual_seed(0)
    sbn, bn = nnk.SyncBatchNorm(3, momentum=momentum), nnk.BatchNorm2d(3, momentum=momentum)
    for _ in range(3):
        x = (torch.randn(4, 3, 2, 2) + 1e7).to(memory_format=torch.channels_last)
        assert torch.equal(sbn(x), bn(x))
    assert torch.equal(sbn.running_var, bn.running_var) and torch.equal(sbn.num_batches_tracked, bn.num_batches_tracked)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        sbn(torch.randn(3))


# ------------------------------------------------------------------------------------------- the example


@pytest.mark.slow
def test_torchrun_example_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    log2, log1 = tmp_path / "two.json", tmp_path / "one.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    common = ["--epochs", "1", "--subset", "192", "--batch-size", "32", "--dtype", "float64", "--json"]
    # both runs at once: most of their time is starting Python and importing torch
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "examples" / "train_ddp.py"), *common, str(log2)],
        [sys.executable, str(ROOT / "examples" / "train_ddp.py"), *common, str(log1)])]
    (two_out, two_err), (one_out, one_err) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 0, two_out[-3000:] + two_err[-3000:]
    assert procs[1].returncode == 0, one_out[-3000:] + one_err[-3000:]
    r2, r1 = json.loads(log2.read_text()), json.loads(log1.read_text())
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert len(r2["losses"]) == len(r1["losses"]) == 6 and 0.0 <= r2["test_accuracy"] <= 1.0
    assert "test accuracy" in two_out and "test accuracy" in one_out
    # the same loss curve: in float64 the README measures 1e-15 over 230 steps; 1e-10 here
    diffs = np.abs(np.array(r2["losses"]) - np.array(r1["losses"]))
    assert diffs.max() <= 1e-10 * max(r1["losses"]), (r2["losses"], r1["losses"])


def test_packed_statistics_round_trip_large_counts():
    """The exchanged buffer carries the count as two float32-exact halves: counts past 2**24 survive."""
    from normkit.ops.sync_batch_norm import _pack_moments, _unpack_moments

    x = torch.randn(4, 3, 5) * 1e30 + 1e37
    m, _ = normkit.moments(x, (0, 2))
    for count in (0, 1, 2 ** 24 + 1, 2 ** 40 + 12345):
        back = _unpack_moments(_pack_moments(m, count, 3, torch.float32, x.device), 3, (1, 3, 1))
        assert back.count == count
        for a, b in zip(back[1:], m[1:]):
            assert torch.equal(a, b)
