"""Module wrappers for functional tensor ops.

Quantizers in precsim are attached to *module outputs* (via forward hooks) and
the integer converter rewrites models module by module. An op written inline
as ``a + b`` or ``a @ b`` is invisible to both, so the model zoo routes every
such op that needs its own quantizer through one of these tiny modules. Use a
separate instance per call site so each site gets its own quantizer.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Add", "MatMul"]


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
