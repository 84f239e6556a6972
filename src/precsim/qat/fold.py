"""BatchNorm folding for quantization-aware training (Jacob et al. 2018, section 3.2).

An integer accelerator runs Conv+BN(+ReLU) as *one* integer conv whose weights are
``w * gamma / sqrt(var + eps)``. If QAT quantized the unfolded ``w`` instead, the shipped
integer weights would be a different rounding of a different tensor and the simulation would
not predict the integer model. So with ``fold_bn`` in the config the weight quantizer of every
Conv/Linear followed by a BatchNorm sees the folded weight:

    weight_used = Q(w * s) / s,   s = gamma / sqrt(running_var + eps)

and the BatchNorm module stays in place (the formulation of Krishnamoorthi 2018 and
``torch.ao``'s ConvBn modules). In training the BN normalizes with batch statistics, so with
quantization off the output equals the unfolded float model; in eval (and, with
``{freeze_after: N}``, in training after N steps) it uses the running statistics and the chain
computes exactly ``conv(x, Q(w * s)) + beta - mean * s``: the folded integer conv. Everything
is plain autograd (no hand-written backward).

With folding, the intermediate outputs of the chain do not exist in the integer model, so their
activation quantizers are switched off (gradient quantization there is kept): the conv's output,
and the BN's output when a ReLU/ReLU6 follows (the ReLU is folded into the integer output clamp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from precsim.qat.graph import trace
from precsim.qat.markers import WEIGHT_TYPES
from precsim.qat.quantizer import Quantizer

BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

__all__ = [
    "FoldChain",
    "FoldedWeight",
    "bn_scale",
    "find_fold_chains",
    "fold_batchnorms",
    "fold_conv_bn",
    "folded_weight_input",
]


# --------------------------------------------------------------------------------------------
# Reference folding
# --------------------------------------------------------------------------------------------


def bn_scale(bn: nn.Module) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` per channel (gamma = 1 without affine)."""
    if bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm with track_running_stats=False (it has no running statistics)")
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    return inv_std if bn.weight is None else bn.weight * inv_std


def _per_out_channel(s: Tensor, w: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (w.dim() - 1)))


def fold_conv_bn(conv_weight: Tensor, conv_bias: Tensor | None, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """The folded ``(weight, bias)`` of Conv/Linear followed by BatchNorm in eval mode.

    ``w' = w * s`` and ``b' = beta + (b - running_mean) * s`` with ``s = gamma / sqrt(var + eps)``,
    so ``conv(x, w') + b' == bn(conv(x, w) + b)``. Output channels are axis 0 of the weight.
    """
    s = bn_scale(bn)
    w = conv_weight * _per_out_channel(s, conv_weight)
    b = torch.zeros_like(s) if conv_bias is None else conv_bias
    beta = torch.zeros_like(s) if bn.bias is None else bn.bias
    return w, beta + (b - bn.running_mean) * s


class FoldedWeight(nn.Module):
    """Weight parametrization ``w -> Q(w * s) / s``: the quantizer sees the folded weight.

    ``quant`` is the weight :class:`Quantizer` (None: no weight quantization, only folding).
    The BatchNorm is referenced, not owned, so its parameters appear once in ``state_dict``.
    """

    def __init__(self, quant: Quantizer | None, bn: nn.Module) -> None:
        super().__init__()
        self.quant = quant
        self.__dict__["bn"] = bn  # a plain reference: not a sub-module (deepcopy keeps it consistent)

    def folded(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(w * s, s) with ``s`` shaped per output channel; zero ``s`` is replaced by 1."""
        s = bn_scale(self.bn)
        s = torch.where(s == 0, torch.ones_like(s), s)
        s = _per_out_channel(s, w)
        return w * s, s

    def forward(self, w: Tensor) -> Tensor:
        wf, s = self.folded(w)
        if self.quant is not None:
            wf = self.quant(wf)
        return wf / s

    def weight_grid(self, w: Tensor) -> tuple[Tensor, Tensor] | None:
        """(scale, zero point) of the weight :meth:`forward` returns for ``w``: codes on the
        quantizer's grid of ``w * s``, divided by ``s`` (per output channel). None before the
        quantizer has run, or without one."""
        grid = None if self.quant is None else self.quant.grid
        if grid is None:
            return None
        return grid[0] / self.folded(w)[1], grid[1]

    def extra_repr(self) -> str:
        return f"bn={type(self.bn).__name__}({self.bn.num_features})"


def folded_weight_input(module: nn.Module) -> Tensor:
    """The tensor the weight quantizer of ``module`` sees: folded if BN folding is on, else the weight."""
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations.weight
        original = plist.original
        p = plist[0]
        if isinstance(p, FoldedWeight):
            return p.folded(original)[0]
        return original
    return module.weight


# --------------------------------------------------------------------------------------------
# Finding and applying the folds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldChain:
    """Names of one Conv/Linear -> BatchNorm (-> ReLU/ReLU6) chain."""

    conv: str
    bn: str
    act: str | None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def find_fold_chains(model: nn.Module, graph: fx.Graph | None = None) -> list[FoldChain]:
    """Every Conv/Linear whose only consumer is a BatchNorm of matching width (plus a ReLU after it)."""
    graph = trace(model) if graph is None else graph
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], WEIGHT_TYPES):
            continue
        conv, user = modules[node.target], _only_user(node)
        if user is None or user.op != "call_module" or not isinstance(modules[user.target], BATCHNORMS):
            continue
        bn = modules[user.target]
        width = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
        if calls[node.target] != 1 or calls[user.target] != 1 or bn.num_features != width:
            continue  # a module used twice cannot carry one folded weight
        if not bn.track_running_stats:
            continue
        act = _only_user(user)
        act_name = None
        if act is not None and act.op == "call_module" and isinstance(modules[act.target], ACTIVATIONS):
            act_name = act.target
        chains.append(FoldChain(node.target, user.target, act_name))
    return chains


def _output_quantizer_off(module: nn.Module) -> None:
    """Switch off the value quantization of a module's output, keeping its gradient quantization.

    Without a gradient format either, the quantizer becomes an ``nn.Identity`` (no copy per call).
    """
    old = getattr(module, "precsim_activation", None)
    if not isinstance(old, Quantizer) or old.spec is None:
        return
    if old.grad_spec is None:
        module.precsim_activation = nn.Identity()
        return
    new = Quantizer("activation", None, old.grad_spec)
    new.seed.copy_(old.seed)
    module.precsim_activation = new.to(old.seed.device)


def _quantizes_output(module: nn.Module) -> bool:
    return getattr(getattr(module, "precsim_activation", None), "spec", None) is not None


def _freeze_pre_hook(bn: nn.Module, args: Any) -> None:
    if bn.training and int(bn.num_batches_tracked) >= bn.precsim_freeze_after:
        bn.training = False  # eval-mode BN: running statistics, no update
        bn.precsim_unfreeze = True


def _freeze_post_hook(bn: nn.Module, args: Any, output: Any) -> None:
    if getattr(bn, "precsim_unfreeze", False):
        bn.training = True
        bn.precsim_unfreeze = False


def fold_batchnorms(model: nn.Module, freeze_after: int | None = None, graph: fx.Graph | None = None) -> list[FoldChain]:
    """Turn on BN folding in a prepared model (``prepare`` calls this for ``fold_bn``).

    Every weight quantizer of a folded Conv/Linear is wrapped in :class:`FoldedWeight`; the
    chain's inner activation quantizers are switched off. ``freeze_after``: after that many
    training steps (BN's ``num_batches_tracked``, saved in checkpoints) the BN uses its running
    statistics in training too and stops updating them. ``graph``: the model's module-level
    graph (:func:`precsim.qat.graph.trace`; default: traced here).
    """
    chains = find_fold_chains(model, graph)
    for ch in chains:
        conv, bn = model.get_submodule(ch.conv), model.get_submodule(ch.bn)
        if parametrize.is_parametrized(conv, "weight"):
            plist = conv.parametrizations.weight
            if len(plist) != 1 or not isinstance(plist[0], Quantizer):
                raise ValueError(f"fold_bn: weight of {ch.conv!r} has parametrizations precsim did not add")
            plist[0] = FoldedWeight(plist[0], bn)
        else:
            parametrize.register_parametrization(conv, "weight", FoldedWeight(None, bn))
        _output_quantizer_off(conv)
        if ch.act is not None and _quantizes_output(model.get_submodule(ch.act)):
            _output_quantizer_off(bn)
        if freeze_after is not None:
            bn.precsim_freeze_after = int(freeze_after)
            bn.register_forward_pre_hook(_freeze_pre_hook)
            bn.register_forward_hook(_freeze_post_hook)
    return chains

