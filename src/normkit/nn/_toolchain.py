"""What every normkit module shares for torch's tool chain: a clear TorchScript refusal, and a rank check that
torch.fx can record (the module checks live inside fx-wrapped functions, so tracing sees one node per module)."""

from __future__ import annotations

from torch import Tensor

SCRIPT_ERROR = ("{cls} cannot be compiled by TorchScript: its computation is hand-written Python "
                "(torch.autograd.Function), which torch.jit.script does not support. Use torch.export.export "
                "(supported, and the path torch recommends), or torch.compile; for a TorchScript file of torch's own "
                "kernels, script normkit.revert(model)")


class NotScriptable:
    """Mixin: ``torch.jit.script`` calls ``__prepare_scriptable__`` on every module before compiling; refuse
    there, with one sentence naming the supported paths, instead of torch's "Can't redefine method: forward"."""

    def __prepare_scriptable__(self):
        raise RuntimeError(SCRIPT_ERROR.format(cls=f"normkit.nn.{type(self).__name__}"))


def check_input_rank(input: Tensor, ranks: tuple[int, ...]) -> None:
    """torch's ``_check_input_dim``: ``expected 4D input (got 3D input)`` / ``expected 2D or 3D input ...``."""
    if input.dim() not in ranks:
        expected = " or ".join(f"{r}D" for r in ranks)
        raise ValueError(f"expected {expected} input (got {input.dim()}D input)")
