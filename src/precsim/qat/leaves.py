"""Which modules the module-level graph keeps whole (its leaves).

A leaf computes (owns no sub-modules of the user's) or carries quantizers: its quantizer hooks
stay attached to its call. Both captures of the graph follow this rule: torch.fx symbolic
tracing (:class:`ModuleTracer`) and ``torch.export`` (:mod:`precsim.qat.module_graph`).
"""

from __future__ import annotations

from torch import fx, nn

from precsim.qat.markers import CONTAINERS
from precsim.qat.quantizer import Quantizer

__all__ = ["ModuleTracer", "own_children"]


def own_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named children that belong to the user's model (not precsim quantizers or parametrizations)."""
    return [(n, c) for n, c in module.named_children() if not (n.startswith("precsim_") or n == "parametrizations")]


class ModuleTracer(fx.Tracer):
    """fx tracer whose leaves are the modules that compute (own no sub-modules) or carry quantizers.

    The default tracer would trace *into* small user modules such as ``precsim.qat.markers.Add`` and
    record an anonymous ``operator.add``; the quantizer hooked on that module would then be lost.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, CONTAINERS):
            return False
        if isinstance(m, Quantizer) or hasattr(m, "precsim_activation") or hasattr(m, "precsim_input"):
            return True
        return super().is_leaf_module(m, module_qualified_name) or not own_children(m)
