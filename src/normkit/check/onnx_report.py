"""What ``normkit check model.onnx`` prints and writes: one row per (norm node, scale) -- rich on a
terminal, plain text otherwise, the hardened file's columns beside the original's with ``--fix`` -- strict
JSON, report.md, and two PNGs (headroom per norm node; error against input scale)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .onnx_probe import FAILED, NOT_TAKEN, NormCase, OnnxResult
from .errors import fmt_err, num
from .report import _plain_table, strict

EVALUATOR_NOTE = {
    "reference": "onnx.reference: every node computed in its declared dtype, as a float16 accelerator does",
    "ort": "ONNX Runtime CPU, optimizations off: it may compute float16 nodes in float32, so an overflow shows "
           "as status 'overflow' (from the float64 run), not in its output",
}


def _mag(v: float | None) -> str:
    return "-" if v is None else ("inf" if not math.isfinite(v) else num(float(f"{v:.2g}")) if v >= 1e-3 else f"{v:.1e}")


def _head(h: float | None) -> str:
    return "-" if h is None else ("inf" if h == math.inf else "-inf" if h == -math.inf else f"{h:.1f}")


def _err(c: NormCase | None) -> str:
    if c is None:
        return "-"
    return "non-finite" if c.status == "non-finite" else fmt_err(c.error)


def _paired(result: OnnxResult, fixed: OnnxResult | None):
    """For each of ``result``'s norms, the index of the same norm in ``fixed`` (matched by output value)."""
    if fixed is None:
        return {}
    where = {s.outputs[0]: i for i, s in enumerate(fixed.norms) if s.outputs}
    return {i: where.get(s.outputs[0]) for i, s in enumerate(result.norms) if s.outputs}


HEADER = ("#", "node (op)", "scale", "max|x|", "var", "largest intermediate", "headroom", "error", "status")
FIX_HEADER = ("fixed: headroom", "error", "status")


def rows(result: OnnxResult, fixed: OnnxResult | None = None) -> list[tuple[str, ...]]:
    pair = _paired(result, fixed)
    out = []
    for i, site in enumerate(result.norms):
        for k, c in enumerate(result.cases_of(i)):
            first = k == 0
            cells = (str(i + 1) if first else "", f"{site.name} ({site.op})" if first else "", num(c.scale), _mag(c.max_input),
                     _mag(c.variance), f"{_mag(c.largest)} = {c.largest_what}" if c.largest is not None else "-",
                     _head(c.headroom), _err(c), c.status)
            if fixed is not None:
                j = pair.get(i)
                f = next((d for d in fixed.cases_of(j) if d.scale == c.scale), None) if j is not None else None
                cells += (_head(f.headroom) if f else "-", _err(f), f.status if f else "not found")
            out.append(cells)
    return out


def pattern_lines(result: OnnxResult) -> list[str]:
    """Per norm of several nodes or inside a body: its nodes and the body holding it."""
    return [f"  {i + 1}: {', '.join(s.nodes)}" + (f" (inside {s.where})" if s.where else "")
            for i, s in enumerate(result.norms) if len(s.nodes) > 1 or s.where]


def finding(result: OnnxResult) -> str:
    """The sentence naming the first failing node, or saying none fails."""
    c = result.first_failure()
    if c is None:
        lowest = [h for i in range(len(result.norms)) if (h := result.lowest_headroom(i)) is not None]
        return (f"no norm fails; lowest headroom {min(lowest):.1f} powers of two" if lowest else
                "no normalization found" if not result.norms else "no norm fails")
    s = result.norms[c.index]
    where = f" ({', '.join(s.nodes)})" if len(s.nodes) > 1 else ""
    text = f"first failing node: {s.name} [{s.op}{where}] from input scale {num(c.scale)}: {c.status}"
    if c.headroom is not None and c.largest is not None:
        text += (f"; {c.largest_what} reaches {_mag(c.largest)}, "
                 + (f"{-c.headroom:.1f} powers of two beyond" if c.headroom < 0 else f"{c.headroom:.1f} powers of two below")
                 + f" {result.dtype}'s largest value {num(c.top)}")
    if c.error is not None:
        text += f"; error {fmt_err(c.error)}"
    if c.message and c.status != "overflow":
        text += f" ({c.message})"
    return text


def verdict(result: OnnxResult) -> str:
    failing = sum(1 for i in range(len(result.norms)) if result.fails_from(i) is not None)
    bad_out = sorted({o["output"] for o in result.outputs if o["status"] == "non-finite"})
    text = f"{'PASS' if result.ok else 'FAIL'}: {failing} of {len(result.norms)} norm(s) fail"
    outs = {}
    for o in result.outputs:
        if o["status"] != "ok":
            outs.setdefault(o["output"], (o["scale"], o["status"]))
    text += "; outputs " + (", ".join(f"{k} {st} from scale {num(sc)}" for k, (sc, st) in outs.items()) if outs else "ok")
    if bad_out:
        text += " (non-finite where float64 is finite)"
    return text


def intro(result: OnnxResult) -> list[str]:
    ins = ", ".join(f"{k} {tuple(v)}" for k, v in result.inputs.items())
    kinds: dict[str, int] = {}
    for s in result.norms:
        kinds[s.op] = kinds.get(s.op, 0) + 1
    lines = [f"normkit check {result.file}: {result.dtype} graph{result.converted}; inputs {ins}; input scales "
             f"{', '.join(num(s) for s in result.scales)}",
             f"evaluator {result.evaluator} ({EVALUATOR_NOTE[result.evaluator]}); reference: the float64 copy in onnx.reference",
             f"{len(result.norms)} normalization(s): " + (", ".join(f"{k} x{v}" for k, v in kinds.items()) or "none")]
    if result.dtype == "float64":
        lines.append("a float64 graph is its own float64 reference: every norm passes by construction (error about 0); "
                     "the headroom is against float64's largest value, 1.8e308")
    lines += [f"not measured: {s.name} ({s.op}) inside {s.where}: {why}" for s, why in result.unmeasured]
    lines += [f"not measured: {s.name} ({s.op}) inside {s.where}: {result.cases_of(i)[0].message}"
              for i, s in enumerate(result.norms) if all(c.status == NOT_TAKEN for c in result.cases_of(i))]
    return lines


def text(result: OnnxResult, fixed: OnnxResult | None = None, fix_path: str | None = None) -> str:
    out = intro(result) + [""]
    if result.norms:
        header = HEADER + (FIX_HEADER if fixed else ())
        out += _plain_table(header, rows(result, fixed)) + [""]
        pats = pattern_lines(result)
        if pats:
            out += ["nodes of each pattern (or that harden replaced), and the body holding it:"] + pats + [""]
    out += [finding(result), verdict(result)]
    if fixed is not None:
        out += ["", f"fixed ({fix_path}): {finding(fixed)}", f"fixed: {verdict(fixed)}"]
    return "\n".join(out)


def print_rich(result: OnnxResult, fixed: OnnxResult | None = None, fix_path: str | None = None, file=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file)
    lines = intro(result)
    console.print(f"[bold]{escape(lines[0])}[/]")
    for line in lines[1:]:
        console.print(escape(line), style="dim")
    if result.norms:
        t = Table(header_style="bold")
        header = HEADER + (FIX_HEADER if fixed else ())
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i in (1, 5) else "right")

        def color(cell, status):
            return f"[red]{escape(cell)}[/]" if status in FAILED else f"[green]{escape(cell)}[/]" if status == "ok" else escape(cell)

        for r in rows(result, fixed):
            cells = [escape(c) for c in r]
            cells[8] = color(r[8], r[8])
            try:
                if float(r[6]) < 2:
                    cells[6] = f"[yellow]{escape(r[6])}[/]" if float(r[6]) >= 0 else f"[red]{escape(r[6])}[/]"
            except ValueError:
                pass
            if fixed is not None:
                cells[11] = color(r[11], r[11])
            t.add_row(*cells)
        console.print(t)
        for line in pattern_lines(result):
            console.print(escape(line), style="dim")
    console.print(escape(finding(result)), style="bold red" if result.first_failure() else "bold")
    console.print(escape(verdict(result)), style="bold green" if result.ok else "bold red")
    if fixed is not None:
        console.print(escape(f"fixed ({fix_path}): {finding(fixed)}"), style="bold")
        console.print(escape(f"fixed: {verdict(fixed)}"), style="bold green" if fixed.ok else "bold red")


# ------------------------------------------------------------------------------------------- JSON, report.md
def result_dict(r: OnnxResult) -> dict:
    first = r.first_failure()
    return {
        "file": r.file, "dtype": r.dtype, "converted": r.converted.strip("; ") or None, "evaluator": r.evaluator,
        "evaluator_note": EVALUATOR_NOTE[r.evaluator], "scales": r.scales, "inputs": r.inputs, "ok": r.ok,
        "first_failure": None if first is None else dict(dataclasses.asdict(first), node=r.norms[first.index].name,
                                                         sentence=finding(r)),
        "norms": [dict(dataclasses.asdict(s), index=i, fails_from=r.fails_from(i), lowest_headroom=r.lowest_headroom(i),
                       cases=[dataclasses.asdict(c) for c in r.cases_of(i)]) for i, s in enumerate(r.norms)],
        "unmeasured": [dict(dataclasses.asdict(s), reason=why) for s, why in r.unmeasured],
        "outputs": r.outputs,
    }


def dumps(result: OnnxResult, fixed: OnnxResult | None = None, fix_path: str | None = None, seed: int = 0) -> str:
    d = {"seed": seed, **result_dict(result)}
    d["fixed"] = None if fixed is None else dict(result_dict(fixed), path=fix_path)
    return json.dumps(strict(d), indent=1, allow_nan=False)


def markdown(result: OnnxResult, fixed: OnnxResult | None, fix_path: str | None, plots: list[str]) -> str:
    out = ["# normkit check (ONNX)", ""] + [f"{line}  " for line in intro(result)] + [""]
    if result.norms:
        header = HEADER + (FIX_HEADER if fixed else ())
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows(result, fixed)]
        out.append("")
        pats = pattern_lines(result)
        if pats:
            out += ["Nodes of each pattern (or that harden replaced), and the body holding it:", ""] + [f"- {p.strip()}" for p in pats] + [""]
    out += [finding(result), "", verdict(result), ""]
    if fixed is not None:
        out += [f"Fixed file `{fix_path}`: {finding(fixed)}", "", verdict(fixed), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- plots
def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def plots(result: OnnxResult, fixed: OnnxResult | None, out_dir: Path) -> list[str]:
    """``headroom.png`` (each norm node's headroom at each scale, powers of two) and ``error.png`` (each
    norm node's isolated error against the input scale); with ``fixed``, the hardened file beside it."""
    from matplotlib.lines import Line2D

    from .cases import TOLERANCE
    from .plots import BAD, SCALE_COLORS, _plt, _style_error_axis, _y

    import torch

    plt = _plt()
    pair = _paired(result, fixed)
    n = len(result.norms)
    labels = [f"{i + 1}: {_short(s.name)}\n{_short(s.op, 30)}" for i, s in enumerate(result.norms)]

    # headroom per norm node
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * n + 3), 4.6))
    ax.axhspan(-200, 0, color="#fbe3e3", lw=0)
    ax.axhspan(0, 2, color="#fff3cd", lw=0)
    handles = []
    hs = [c.headroom for c in result.cases if c.headroom is not None and math.isfinite(c.headroom)]
    if fixed is not None:
        hs += [c.headroom for c in fixed.cases if c.headroom is not None and math.isfinite(c.headroom)]
    for k, s in enumerate(result.scales):
        col = SCALE_COLORS[k % len(SCALE_COLORS)]
        dx = (k - (len(result.scales) - 1) / 2) * min(0.22, 0.8 / len(result.scales))  # scales side by side
        pts = [(c.index, c.headroom) for c in result.cases if c.scale == s and c.headroom is not None and math.isfinite(c.headroom)]
        ax.plot([i + dx - (0.04 if fixed else 0) for i, _ in pts], [h for _, h in pts], "x", color=col, ms=8, mew=2)
        if fixed is not None:
            fpts = [(i, d.headroom) for i, j in pair.items() if j is not None for d in fixed.cases_of(j)
                    if d.scale == s and d.headroom is not None and math.isfinite(d.headroom)]
            ax.plot([i + dx + 0.04 for i, _ in fpts], [h for _, h in fpts], "o", color=col, ms=6, mfc="none", mew=1.5)
        handles.append(Line2D([], [], color=col, marker="s", ls="", label=f"input scale {num(s)}"))
    handles.append(Line2D([], [], color="k", marker="x", ls="", label="original"))
    if fixed is not None:
        handles.append(Line2D([], [], color="k", marker="o", mfc="none", ls="", label="hardened (--fix)"))
    lo, hi = (min(hs + [0.0]) - 1, max(hs + [2.0]) + 1) if hs else (-2, 16)
    ax.set_ylim(lo, hi)
    ax.axhline(0, color="#d62728", lw=1)
    ax.axhline(2, color="#b8860b", lw=0.8, ls="--")
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel(f"headroom: log2({result.dtype} max / largest intermediate)", fontsize=8)
    ax.grid(True, axis="y", lw=0.3, alpha=0.6)
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    ax.set_title(f"{result.file}: {result.dtype} headroom per normalization (red: overflows; yellow: within 2 powers "
                 f"of two)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "headroom.png", dpi=110)
    plt.close(fig)

    # error against scale
    fig, ax = plt.subplots(figsize=(7, 4.4))
    tol = TOLERANCE[getattr(torch, result.dtype)]
    for i, s in enumerate(result.norms):
        col = SCALE_COLORS[i % len(SCALE_COLORS)]
        cs = [c for c in result.cases_of(i) if c.status != "range"]
        ax.plot([c.scale for c in cs], [_y(c.error if c.status != "non-finite" else None) for c in cs], "-x", color=col,
                ms=7, mew=1.8, lw=1.2, label=f"{i + 1}: {_short(s.name, 24)}")
        j = pair.get(i)
        if j is not None:
            fs = [c for c in fixed.cases_of(j) if c.status != "range"]
            ax.plot([c.scale for c in fs], [_y(c.error if c.status != "non-finite" else None) for c in fs], "--o",
                    color=col, ms=5, mfc="none", lw=1.0, label=f"{i + 1}: hardened")
    ax.set_xscale("log")
    _style_error_axis(ax, tol)
    ax.set_xlabel("input scale", fontsize=8)
    ax.set_ylabel("max rel. error vs float64", fontsize=8)
    ax.legend(fontsize=7, loc="center left")
    ax.set_title(f"{result.file}: each norm judged alone ({result.dtype}, evaluator {result.evaluator})\n"
                 f"dashed: tolerance {tol:.1e}; top band (y={BAD:g}): non-finite", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "error.png", dpi=110)
    plt.close(fig)
    return ["headroom.png", "error.png"]
