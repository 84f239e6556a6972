"""Markers: the module types that say where a model computes what precsim quantizes.

Quantizers in precsim are attached to *module outputs* (via forward hooks) and
the integer converter rewrites models module by module. An op written inline
as ``a + b`` or ``a @ b`` is invisible to both, so a model routes every
such op that needs its own quantizer through one of these tiny modules
(:class:`QuantPoint` marks a plain tensor, like the paper's QuantStub). Use a
separate instance per call site so each site gets its own quantizer.

The type tables below (layers with weights, containers) are the one list that
``prepare``, BN folding, bias quantization and ``convert`` share.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CONTAINERS", "WEIGHT_TYPES", "Add", "MatMul", "MeanPool", "QuantPoint"]

# layers whose weight is quantized and that an integer model runs as one GEMM
WEIGHT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# modules that only hold others: never a leaf of the traced graph, never a quantization point
CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class QuantPoint(nn.Module):
    """Identity that marks a tensor for quantization (like the paper's QuantStub)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Add(nn.Module):
    """Elementwise ``a + b`` as a module, so its output can be quantized.

    Residual joins add two tensors that usually carry different scales; in an
    integer pipeline that addition needs its own requantization step, which a
    hook on this module provides.
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class MatMul(nn.Module):
    """Batched matrix product ``a @ b`` as a module, so its output can be quantized.

    Attention multiplies two *activations* (``q @ k^T`` and ``attn @ v``); unlike
    an ``nn.Linear`` there is no weight to hang a quantizer on, so the op itself
    has to be a module.
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class MeanPool(nn.Module):
    """The mean of ``hidden`` over the tokens a 0/1 ``mask`` keeps (sentence-transformers' pooling).

    A module so that the integer converter sees one op (an integer sum and one division by the
    token count) instead of the float ops it is written in.
    """

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
