"""What ``normkit check`` prints and writes: the summary table (rich on a terminal, plain text otherwise),
strict JSON (no Infinity/NaN: non-finite numbers become null beside a status), and report.md."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

import torch

from .errors import fmt_err, num
from .probe import HARDEN_HINT, ModelResult
from .sweep import Row, Summary, summarize


def fmt_mag(m: float | None, top: float | None = None) -> str:
    if m is None:
        return "none"
    return f"{num(m)} (top)" if top is not None and m == top else num(m)


# ------------------------------------------------------------------------------------------- ops table
OP_HEADER = ("op", "dtype", "torch ok up to", "normkit ok up to", "torch worst", "normkit worst",
             "torch non-finite", "normkit non-finite", "torch fails")


def op_cells(s: Summary) -> tuple[str, ...]:
    return (s.op, s.dtype, "refused" if s.torch_refused and s.torch_ok_up_to is None else fmt_mag(s.torch_ok_up_to, s.top),
            fmt_mag(s.normkit_ok_up_to, s.top), "refused" if s.torch_worst is None else fmt_err(s.torch_worst),
            fmt_err(s.normkit_worst), str(s.torch_nonfinite), str(s.normkit_nonfinite),
            f"{len(s.torch_failures)}/{s.cases}")


def _output_error(o: dict) -> str:
    e = fmt_err(o["error"]) if o["error"] is not None else o["status"]
    base = f"; {fmt_err(o['baseline'])} at input scale 1" if o.get("baseline") is not None else ""
    return f"max rel err {e}{base}" if o["status"] != "raised" else f"raises in {o['layer'] or 'its forward'}"


def model_lines(r: ModelResult) -> list[str]:
    """One line per dtype: torch's first failing layer (or why the output is wrong without one), and
    normkit's where it differs."""
    lines = []
    for d in r.dtypes:
        f = r.first_failure(d, "torch")
        text = f.sentence() if f else "no layer fails"
        odd = r.unexplained(d, "torch")
        if odd:
            text = (f"no judged layer fails, but the model's output is wrong from input scale {num(odd['scale'])} "
                    f"({_output_error(odd['torch'])}): a computation the probe does not judge breaks there "
                    f"(e.g. a hand-written norm)")
        nk = r.first_failure(d, "normkit")
        if nk and (not f or (nk.layer, nk.scale) != (f.layer, f.scale)):
            text += f"; normkit: {nk.sentence()}"
        nk_odd = r.unexplained(d, "normkit")
        if nk_odd and not odd:
            text += (f"; normkit's model: output wrong from input scale {num(nk_odd['scale'])} "
                     f"({_output_error(nk_odd['normkit'])}) where no judged layer fails")
        rng = r.first_out_of_range(d)
        if rng:
            text += (f"; from input scale {num(rng.scale)} {rng.layer} ({rng.kind}) leaves the {d} range "
                     f"(no normalization can fix that)")
        lines.append(f"{d:<9} {text}")
    return lines


def model_notes(r: ModelResult) -> list[str]:
    """What the per-dtype lines do not say: norm layers normkit.convert leaves (and how they are hardened),
    a float64 reference that is not float64 throughout, an interrupted probe."""
    notes = []
    left = r.robust_layers()
    if left:
        kinds = Counter(c.kind for c in left)
        why = dict.fromkeys(r.left[c.layer].split("; ")[0] for c in left if c.layer in r.left)
        notes.append(f"normkit.convert leaves {len(left)} normalization(s) "
                     f"({', '.join(f'{k} x{n}' for k, n in kinds.items())}"
                     + (f": {'; '.join(why)}" if why else "") +
                     f"); normkit.robust() serves them, as judged above: {HARDEN_HINT} to harden them")
    none = list({c.index: c for c in r.cases if c.normkit_by == "none"}.values())
    if none:
        notes.append(f"normkit has no version of {len(none)} norm layer(s) ("
                     f"{', '.join(dict.fromkeys(c.kind for c in none))}): they compute without any torch norm "
                     f"function, so neither normkit.convert nor normkit.robust() reaches them")
    if r.lowered:
        notes.append(f"the float64 reference is not float64 throughout ({', '.join(r.lowered)}): the model forces "
                     f"a lower precision that cannot be lifted, so errors measured against it are not trusted")
    if not r.complete:
        notes.append("interrupted: only the (dtype, scale) pairs that finished are shown")
    return notes


def _plain_table(header, rows) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def verdict(m: ModelResult) -> str:
    """One sentence: does normkit hold on this model, and if not, why not."""
    problems = []
    if not m.normkit_ok:
        problems.append("normkit's norm layers FAIL")
    if not m.normkit_output_ok:
        problems.append("normkit's model output is wrong")
    if any(m.unexplained(d, "torch") for d in m.dtypes):
        problems.append("torch's output is wrong where no judged layer fails")
    if m.lowered:
        problems.append("not verified: the float64 reference is not float64 throughout")
    if problems:
        return f"{m.model}: {'; '.join(problems)}."
    n = len(m.robust_layers())
    via = f" ({n} of them under normkit.robust(), which normkit.convert does not replace)" if n else ""
    return f"{m.model}: normkit's norm layers all pass{via}."


def headline(rows: list[Row], models: list[ModelResult]) -> str:
    torch_fail = sum(not r.torch_ok for r in rows)
    nk_fail = sum(not r.normkit_ok for r in rows)
    parts = []
    if rows:
        parts.append(f"torch fails {torch_fail} of {len(rows)} op cases; normkit fails {nk_fail}.")
    parts += [verdict(m) for m in models]
    return " ".join(parts)


def ok(rows: list[Row], models: list[ModelResult]) -> bool:
    """The exit-status verdict: every normkit op case passes and every probed model's verdict is ok."""
    return all(r.normkit_ok for r in rows) and all(m.ok for m in models)


def backend_info(status: dict, paths: dict[str, list[str]]) -> dict:
    """Which backend served normkit's ops in this run: the selected backend, the build state of the native
    kernels, and every path each kernel family took (``native``, or ``eager (<why>)``)."""
    return {"selected": status["backend"], "kernels": status["kernels"], "paths": paths}


def backend_line(backend: dict | None) -> str:
    if not backend:
        return ""
    paths = "; ".join(f"{op}: {', '.join(p)}" for op, p in backend["paths"].items()) or "no op ran"
    return f"normkit backend {backend['selected']} (kernels {backend['kernels']}). Paths taken: {paths}"


INTRO = ("error = max|out - ref| / max|ref| against a float64 reference on the same rounded input; "
         "'ok up to' = largest input magnitude up to which every magnitude passes")


def text(rows: list[Row], models: list[ModelResult], backend: dict | None = None) -> str:
    out = [f"normkit check: torch {torch.__version__} vs normkit, forward", INTRO, ""]
    if rows:
        out += _plain_table(OP_HEADER, [op_cells(s) for s in summarize(rows)]) + [""]
    for m in models:
        out.append(f"{m.header()}: first failing layer (torch), judged layer by layer")
        out += ["  " + line for line in model_lines(m) + model_notes(m)] + [""]
    out.append(headline(rows, models))
    if backend:
        out.append(backend_line(backend))
    return "\n".join(out)


def print_rich(rows: list[Row], models: list[ModelResult], backend: dict | None = None, file=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file)
    console.print(f"[bold]normkit check[/]: torch {torch.__version__} vs normkit, forward")
    console.print(INTRO, style="dim")
    if rows:
        t = Table(header_style="bold")
        for i, h in enumerate(OP_HEADER):
            t.add_column(h, justify="left" if i < 2 else "right")
        for s in summarize(rows):
            c = list(op_cells(s))
            c[2] = f"[red]{c[2]}[/]" if (s.torch_ok_up_to or 0) < s.top else f"[green]{c[2]}[/]"
            c[3] = f"[green]{c[3]}[/]" if s.normkit_ok else f"[red]{c[3]}[/]"
            c[8] = f"[red]{c[8]}[/]" if s.torch_failures else c[8]
            t.add_row(*c)
        console.print(t)
    for m in models:
        t = Table(title=escape(m.header()), title_justify="left", header_style="bold")
        t.add_column("dtype")
        t.add_column("first failing layer (torch), judged layer by layer")
        for line in model_lines(m):
            d, _, rest = line.partition(" ")
            rest = escape(rest.strip())
            t.add_row(d, f"[red]{rest}[/]" if not rest.startswith("no layer fails") else f"[green]{rest}[/]")
        console.print(t)
        for note in model_notes(m):
            console.print(escape(note), style="yellow")
    console.print(headline(rows, models), style="bold green" if ok(rows, models) else "bold red")
    if backend:
        console.print(escape(backend_line(backend)), style="dim")


# ------------------------------------------------------------------------------------------- JSON
def strict(obj):
    """``obj`` with every non-finite float replaced by None (so ``json.dumps(allow_nan=False)`` holds)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def _row_dict(r: Row) -> dict:
    d = dataclasses.asdict(r)
    d.update(torch_ok=r.torch_ok, normkit_ok=r.normkit_ok,
             torch_status="refused" if r.torch_error is None else ("non-finite" if not math.isfinite(r.torch_error)
                                                                   else ("ok" if r.torch_ok else "fail")),
             normkit_status="non-finite" if not math.isfinite(r.normkit_error) else ("ok" if r.normkit_ok else "fail"))
    return d


def model_dict(m: ModelResult) -> dict:
    def finding(f):
        return None if f is None else dict(dataclasses.asdict(f), sentence=f.sentence())
    return {
        "model": m.model, "input_shape": list(m.input_shape), "input_embedding": m.embedding, "vocab": m.vocab, "mode": m.mode, "dtypes": m.dtypes, "scales": m.scales,
        "ok": m.ok, "normkit_ok": m.normkit_ok, "normkit_output_ok": m.normkit_output_ok, "complete": m.complete,
        "reference_lowered": m.lowered, "left_by_convert": m.left, "notes": model_notes(m), "verdict": verdict(m),
        "first_failure": {d: {"torch": finding(m.first_failure(d, "torch")),
                              "normkit": finding(m.first_failure(d, "normkit"))} for d in m.dtypes},
        "outputs": m.outputs,
        "layers": [dataclasses.asdict(c) for c in m.cases],
    }


def as_dict(rows: list[Row], models: list[ModelResult], seed: int, backend: dict | None = None,
            complete: bool = True) -> dict:
    """Everything as a strict-JSON-ready dict; ``complete=False``: the run was interrupted (what finished)."""
    return strict({
        "torch_version": torch.__version__, "seed": seed, "backend": backend, "complete": complete,
        "ok": ok(rows, models),
        "ops": {"rows": [_row_dict(r) for r in rows], "summary": [dataclasses.asdict(s) for s in summarize(rows)]},
        "models": [model_dict(m) for m in models],
    })


def dumps(rows, models, seed: int, backend: dict | None = None, complete: bool = True) -> str:
    return json.dumps(as_dict(rows, models, seed, backend, complete), indent=1, allow_nan=False)


# ------------------------------------------------------------------------------------------- report.md
def markdown(rows: list[Row], models: list[ModelResult], plots: list[str], backend: dict | None = None) -> str:
    out = [f"# normkit check", "", f"torch {torch.__version__} vs normkit, forward. {INTRO}.", ""]
    if rows:
        out += ["## Operators", "", "| " + " | ".join(OP_HEADER) + " |", "|" + "---|" * len(OP_HEADER)]
        out += ["| " + " | ".join(op_cells(s)) + " |" for s in summarize(rows)]
        fails = [s for s in summarize(rows) if s.torch_failures]
        if fails:
            out += ["", "Inputs where torch fails:", ""]
            out += [f"- {s.op} {s.dtype}: {', '.join(s.torch_failures)}" for s in fails]
        out.append("")
    for m in models:
        out += [f"## {m.model}", "", f"{m.header()}; each layer judged on the float64 model's input to it, rounded "
                f"to the dtype.", ""]
        out += [f"- {line.split(' ', 1)[0]}: {line.split(' ', 1)[1].strip()}" for line in model_lines(m)]
        out += [f"- {note}" for note in model_notes(m)]
        out += ["", "| dtype | scale | torch output | normkit output |", "|---|---|---|---|"]
        for o in m.outputs:
            def cell(v):
                return v["status"] + (f" ({fmt_err(v['error'])})" if v["error"] is not None else "") + \
                    (f" at {v['layer']}" if v["layer"] else "") + (" -- wrong" if v["wrong"] else "")
            out.append(f"| {o['dtype']} | {num(o['scale'])} | {cell(o['torch'])} | {cell(o['normkit'])} ({o['normkit_by']}) |")
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if backend:
        out += ["## Backend", "", f"Selected: {backend['selected']}; native kernels: {backend['kernels']}.", ""]
        out += [f"- {op}: {', '.join(p)}" for op, p in backend["paths"].items()] + [""]
    out.append(headline(rows, models))
    return "\n".join(out) + "\n"
