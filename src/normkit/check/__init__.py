"""``normkit check``: where torch's normalization breaks -- op, dtype, input magnitude, model layer -- and
whether normkit holds there.

* :mod:`.cases`   the one case registry (the tests and the benchmarks use it too): the ops (torch's,
  normkit's, a float64 reference), dtypes, tolerances, inputs
* :mod:`.errors`  the score: ``max|out - ref| / max|ref|``, non-finite counts
* :mod:`.sweep`   the operator sweep and its per-(op, dtype) summary
* :mod:`.probe`   the layer-by-layer model probe (forward hooks, each layer judged in isolation)
* :mod:`.report`  the table, strict JSON, report.md;  :mod:`.plots` the PNGs
* :mod:`.command` the ``normkit check`` subcommand;  :mod:`.models` resolving ``--model``
* :mod:`.onnx_command`, :mod:`.onnx_probe`, :mod:`.onnx_report`: ``normkit check MODEL.onnx`` (the headroom of
  every norm node of an ONNX graph)
"""

from .cases import DTYPES, INPUTS, OPS, SHAPE, TOLERANCE, Input, Op, lrn_reference, reference
from .errors import relative_error
from .probe import ModelResult, ProbeInputError, ProbeInterrupted
from .probe import probe as probe_model
from .sweep import Row, Summary, run, summarize


__all__ = ["DTYPES", "INPUTS", "OPS", "SHAPE", "TOLERANCE", "Input", "Op", "Row", "Summary", "ModelResult",
           "ProbeInputError", "ProbeInterrupted", "probe_model", "reference", "lrn_reference", "relative_error", "run", "summarize"]
