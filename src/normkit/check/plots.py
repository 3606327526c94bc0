"""PNG plots for ``normkit check --report`` (matplotlib, Agg backend): error against input magnitude per op
and dtype (torch vs normkit, log-log), and per model the error of each layer at each input scale."""

from __future__ import annotations

import math
from pathlib import Path

from .cases import TOLERANCE
from .probe import ModelResult
from .errors import num
from .sweep import Row

FLOOR = 1e-9  # errors below this (often exactly 0) are drawn on it
BAD = 10.0    # where non-finite outputs and refusals are drawn
TORCH, NORMKIT = "#d62728", "#1f77b4"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _y(e):
    if e is None or not math.isfinite(e):
        return BAD
    return max(e, FLOOR)


def _style_error_axis(ax, tol):
    ax.set_yscale("log")
    ax.set_ylim(FLOOR / 2, BAD * 3)
    ax.axhline(tol, color="0.4", lw=0.8, ls="--")
    ax.axhspan(BAD / 2, BAD * 3, color="#fbe3e3", lw=0)
    ax.grid(True, which="major", lw=0.3, alpha=0.6)


def op_plots(rows: list[Row], out_dir: Path) -> list[str]:
    """One PNG per dtype, a panel per op: max relative error against input magnitude."""
    import torch

    plt = _plt()
    files = []
    for dtype in dict.fromkeys(r.dtype for r in rows):
        ops = list(dict.fromkeys(r.op for r in rows if r.dtype == dtype))
        cols = min(3, len(ops))
        nrows = math.ceil(len(ops) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False, sharey=True)
        tol = TOLERANCE[getattr(torch, dtype)]
        for ax, op in zip(axes.flat, ops):
            rs = sorted((r for r in rows if r.op == op and r.dtype == dtype and r.magnitude), key=lambda r: r.magnitude)
            mags = [r.magnitude for r in rs]
            if all(r.torch_error is None for r in rs):
                ax.text(0.5, 0.3, "torch refuses this dtype", transform=ax.transAxes, ha="center", color=TORCH, fontsize=9)
            else:
                ax.plot(mags, [_y(r.torch_error) for r in rs], "-x", color=TORCH, ms=4, lw=1.2, label="torch")
            ax.plot(mags, [_y(r.normkit_error) for r in rs], "-o", color=NORMKIT, ms=3, lw=1.2, label="normkit")
            ax.set_xscale("log")
            _style_error_axis(ax, tol)
            ax.set_title(op, fontsize=10)
            ax.set_xlabel("input magnitude max|x|", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in axes[:, 0]:
            ax.set_ylabel("max rel. error", fontsize=8)
        for ax in list(axes.flat)[len(ops):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, loc="center left")
        fig.suptitle(f"{dtype}: error vs float64 reference (dashed: tolerance {tol:.1e}; shaded band: "
                     f"non-finite output)", fontsize=10)
        fig.tight_layout()
        name = f"ops_{dtype}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


SCALE_COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def model_plot(m: ModelResult, out_dir: Path) -> str:
    """One PNG per model, a panel per dtype: each layer's isolated error at each input scale."""
    import torch
    from matplotlib.lines import Line2D

    plt = _plt()
    n = len(m.layers)
    height = 2.8 * len(m.dtypes) + 2.2  # panels, the layer names below, 0.9 in of title and legend above
    fig, axes = plt.subplots(len(m.dtypes), 1, figsize=(max(9, 0.17 * n + 3), height), squeeze=False, sharex=True)
    norm_idx = sorted({c.index for c in m.cases if c.is_norm})
    handles = []
    for ax, dtype in zip(axes[:, 0], m.dtypes):
        cases = [c for c in m.cases if c.dtype == dtype]
        for i in norm_idx:
            ax.axvspan(i - 0.4, i + 0.4, color="0.9", lw=0, zorder=0)
        for k, s in enumerate(m.scales):
            cs = sorted((c for c in cases if c.scale == s and c.torch_status != "range"), key=lambda c: c.index)
            if not cs:
                continue
            col = SCALE_COLORS[k % len(SCALE_COLORS)]
            dx = (k - (len(m.scales) - 1) / 2) * 0.12  # side by side, so equal errors stay visible
            ax.plot([c.index + dx for c in cs], [_y(c.torch_error) for c in cs], "x", color=col, ms=6, mew=1.5)
            ax.plot([c.index + dx for c in cs], [_y(c.normkit_error) for c in cs], "o", color=col, ms=3.5, mfc="none", mew=1.1)
            if not any(h.get_label() == f"input scale {num(s)}" for h in handles):
                handles.append(Line2D([], [], color=col, marker="s", ls="", label=f"input scale {num(s)}"))
        rng = sorted({c.index for c in cases if c.torch_status == "range"})
        if rng:
            ax.plot(rng, [FLOOR] * len(rng), "|", color="0.5", ms=8)
        _style_error_axis(ax, TOLERANCE[getattr(torch, dtype)])
        ax.set_ylabel(f"{dtype}\nmax rel. error", fontsize=8)
        ax.tick_params(labelsize=7)
    ax = axes[-1, 0]
    ax.set_xticks(range(n))
    ax.set_xticklabels(m.layers, rotation=90, fontsize=6 if n > 30 else 7)
    for i, label in enumerate(ax.get_xticklabels()):
        if i in norm_idx:
            label.set_fontweight("bold")
    ax.set_xlim(-0.7, n - 0.3)
    handles += [Line2D([], [], color="k", marker="x", ls="", label="torch"),
                Line2D([], [], color="k", marker="o", mfc="none", ls="", label="normkit twin")]
    fig.suptitle(f"{m.header()}: each layer fed the float64 model's input to it, "
                 f"rounded to the dtype\ngrey columns: norm layers; top band: non-finite or raised; dashed: tolerance; "
                 f"bottom row: exact (< 1e-9); |: outside the dtype's range", fontsize=9)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.45 / height), ncol=len(handles),
               fontsize=8, frameon=False)
    fig.tight_layout()
    fig.subplots_adjust(top=1 - 0.85 / height)
    name = f"model_{m.model}.png".replace("/", "_").replace(":", "_")
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name
