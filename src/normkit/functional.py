"""normkit's ``torch.nn.functional``-style API: torch's exact signatures, defaults and semantics.

Each function validates its input, then runs a hand-written ``torch.autograd.Function`` whose math lives
in :mod:`normkit.ops` (one file per operator, next to its formula). Running statistics are updated in place
exactly as torch does; the ``*_stateless`` forms return them instead, for ``torch.func`` transforms.

Every function here is registered with ``torch.fx.wrap``: ``torch.fx.symbolic_trace`` records a call made
through this module (``normkit.functional.layer_norm(x, ...)``, as normkit's modules make it) as one
``call_function`` node instead of tracing into the input checks. A name imported into your own module
(``from normkit.functional import layer_norm``) is a different global: wrap it there too
(``torch.fx.wrap("layer_norm")`` at your module's top level), or call it through the module.
"""

import torch.fx

from .ops.batch_norm import batch_norm, batch_norm_stateless
from .ops.group_norm import group_norm
from .ops.instance_norm import instance_norm, instance_norm_stateless
from .ops.layer_norm import layer_norm
from .ops.local_response_norm import local_response_norm, lrn, tf_local_response_normalization
from .ops.rms_norm import rms_norm

__all__ = [
    "batch_norm",
    "batch_norm_stateless",
    "group_norm",
    "instance_norm",
    "instance_norm_stateless",
    "layer_norm",
    "local_response_norm",
    "lrn",
    "rms_norm",
    "tf_local_response_normalization",
]

for _name in __all__:
    torch.fx.wrap(_name)
del _name
