"""Train a small ResNet with normkit's SyncBatchNorm under DistributedDataParallel on CPU (gloo).

    torchrun --nproc_per_node=2 examples/train_ddp.py --epochs 10     # two processes, one global batch
    python examples/train_ddp.py --epochs 10                          # one process, the same full batch

Data: scikit-learn's bundled handwritten digits (``load_digits``: 1797 8x8 images shipped inside the
package, no download), a fixed 1437 / 360 train / test split. Each step takes one global batch (the same
on every rank), and rank ``r`` trains on its contiguous share of it (shares differ by at most one image;
a rank may get none). SyncBatchNorm normalizes with the statistics of the whole global batch, and each
rank's loss is its sum over the share times ``world_size / global batch size``, so DDP's gradient average
is exactly the gradient of the full batch's mean loss: the run with one process and the full batch
follows the same loss curve, up to float32 rounding (``--json`` writes the curve to compare).

Flags: ``--epochs``, ``--batch-size`` (global), ``--lr``, ``--subset N`` (the first N training images),
``--threads`` (torch threads per process), ``--seed``, ``--dtype float32|float64``, ``--json PATH``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import normkit.nn as nnk


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size, split across the ranks")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--subset", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="float64 shows the one- and two-process loss curves agree to rounding over a whole run")
    p.add_argument("--json", type=str, default=None, help="write the loss curve and accuracy here (rank 0)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 2:
        p.error("--epochs must be >= 1 and --batch-size >= 2")
    return args


# ------------------------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nnk.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nnk.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nnk.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet for 8x8 single-channel images: stem, two stages of one basic block, global pooling."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nnk.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------- data


def load_data(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = 1437
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = (x - mean) / std
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def share(n: int, world_size: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one; may be empty)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


# ------------------------------------------------------------------------------------------- run


def init_distributed():
    """torchrun's environment, or (plain ``python``) a world of one, so the same code path runs."""
    timeout = datetime.timedelta(seconds=60)
    if "RANK" in os.environ:
        dist.init_process_group("gloo", timeout=timeout)
        return None
    tmp = tempfile.TemporaryDirectory()
    dist.init_process_group("gloo", init_method=f"file://{tmp.name}/rendezvous", rank=0, world_size=1, timeout=timeout)
    return tmp


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keep = init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    (x_train, y_train), (x_test, y_test) = load_data(args.seed)
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)
    if args.subset is not None:
        x_train, y_train = x_train[: args.subset], y_train[: args.subset]

    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = nnk.SyncBatchNorm.convert_sync_batchnorm(SmallResNet().to(dtype))
    # SyncBatchNorm keeps the running statistics identical on every rank: no buffer broadcasts needed
    try:
        ddp = DistributedDataParallel(model, forward_sync_buffers=False)  # torch >= 2.13
    except TypeError:
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)

    n = len(y_train)
    batches = [(s, min(s + args.batch_size, n)) for s in range(0, n, args.batch_size)]
    batches = [(a, b) for a, b in batches if b - a >= 2]  # one image would leave batch norm undefined
    losses, epoch_losses = [], []
    start = time.perf_counter()
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=args.epochs * len(batches), desc=f"train ({world_size} process{'es' if world_size > 1 else ''})", unit="step")
    for epoch in range(args.epochs):
        ddp.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))  # same on every rank
        epoch_sum = torch.zeros((), dtype=torch.float64)
        for a, b in batches:
            idx = order[a:b][share(b - a, world_size, rank)]
            opt.zero_grad(set_to_none=True)
            logits = ddp(x_train[idx])
            local_sum = F.cross_entropy(logits, y_train[idx], reduction="sum")
            (local_sum * (world_size / (b - a))).backward()  # DDP averages: the full batch's mean loss
            opt.step()
            total = local_sum.detach().double().clone()
            dist.all_reduce(total)  # logging only: the global batch's mean loss
            loss = total.item() / (b - a)
            losses.append(loss)
            epoch_sum += total
            if progress is not None:
                progress.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}")
                progress.update()
        epoch_losses.append(epoch_sum.item() / batches[-1][1] if batches else float("nan"))
    wall = time.perf_counter() - start
    if progress is not None:
        progress.close()

    model.eval()  # running statistics, identical on every rank: evaluate on rank 0 without communicating
    result = {"world_size": world_size, "epochs": args.epochs, "train_images": n, "losses": losses,
              "epoch_losses": epoch_losses, "wall_time_s": wall}
    if rank == 0:
        with torch.no_grad():
            acc = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
        result["test_accuracy"] = acc
        print(f"world size {world_size}: {args.epochs} epochs on {n} images in {wall:.1f} s; "
              f"final loss {losses[-1]:.4f}; test accuracy {acc:.4f} ({len(y_test)} images)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    del keep
    return result


if __name__ == "__main__":
    main()
