"""integer_exact(model): the simulated model evaluated with the integer model's fixed-point maths.

Plain fake quantization rounds ``y / S_out`` of a float32 result; the integer model rounds
``M0 * acc * 2^-n`` of an exact integer accumulator (int32 bias at S_in S_w, gemmlowp's
double rounding or TFLite's single rounding). The two agree except where float32 noise lands a value on the other side of
a rounding tie -- rare per element, but a deep network spreads each such flip. Inside
``integer_exact`` the prepared model's forward is evaluated from its live quantizers with the
integer arithmetic instead: accumulators are computed exactly (float64 conv/linear/pooling on
the centred codes ``(q1 - Z1)(q2 - Z2)``, every partial sum an integer below 2^53, checked) and
requantized with the fixed-point multipliers of :mod:`precsim.integer.fixedpoint` in the
chosen rounding mode (the reference functions, not the integer model's fused kernels). The
constants are the ones :func:`convert` derives, the kernels are independent of the integer
model's (channels-first float64 instead of channels-last int32 im2col with precomputed
zero-point terms), so equal codes test the integer kernels code for code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from precsim.integer.convert import convert

__all__ = ["integer_exact"]


@contextmanager
def integer_exact(model: nn.Module, rounding: str = "gemmlowp", example: Tensor | None = None) -> Iterator[nn.Module]:
    """Within the block, ``model(x)`` returns the fixed-point simulation's output (float, on the output grid).

    The model is put in ``eval()`` mode (restored afterwards); its quantizers are read once on
    entry, so train the model or calibrate it first. ``rounding`` is the requantization mode of
    the integer model it predicts (``convert(model, rounding=...)``): ``"gemmlowp"`` (default)
    or ``"single"``. ``example``: an input batch, so that the model is captured with
    ``torch.export`` (as ``convert(model, example=...)``). Raises like :func:`convert` for
    models that have no integer form, and ValueError for an unknown ``rounding``.
    """
    was_training = model.training
    model.eval()  # convert() reads the eval-mode model (running statistics, rounded folded biases)
    try:
        imodel = convert(model, example, rounding=rounding)
    except Exception:
        model.train(was_training)
        raise
    had_forward = "forward" in model.__dict__
    old_forward = model.__dict__.get("forward")

    def forward(x: Tensor) -> Tensor:
        with torch.no_grad():
            codes = imodel.run_reference(imodel.quantize_input(x.cpu()))
        return imodel.dequantize_output(codes).to(x.device)

    model.forward = forward  # type: ignore[method-assign]
    try:
        yield model
    finally:
        if had_forward:
            model.forward = old_forward  # type: ignore[method-assign]
        else:
            del model.forward
        model.train(was_training)
