"""The built-in schemes: Tamiya et al.'s Table 1 plus two OCP Microscaling (MX) rows.

A *scheme* is a named :func:`precsim.prepare` config. The defaults follow Table 1 of
Tamiya, Hashimoto, Kawabe, "A Precision Simulator of Deep Neural Network Quantization":

========================  =====================  ==========================  ========================
name                      forward (act, weight)  gradient (act, weight)      why it is here
========================  =====================  ==========================  ========================
``fp32``                  fp32                   fp32                        the baseline
``qint8``                 int8                   fp32                        Table 1 "Qint8 (grad fp32)"
``qint8_grad8``           int8                   int8                        Table 1 "Qint8 (grad qint8)"
``bf16``                  bf16                   bf16                        Table 1 "bfloat16"
``flexfp8``               hfp8_fwd (1-4-3, b11)  hfp8_bwd (1-5-2)            Table 1 "FlexFP8", fixed bias
``flexfp8_gs10k``         hfp8_fwd               hfp8_bwd, gradients x 10^4  Table 1 "... grad scaling 10k"
``flexfp8_dse``           dse(e=4,m=3)           dse(e=5,m=2)                Table 1 "FlexFP8 DSE"
``mxfp8``                 mxfp8_e4m3             mxfp8_e5m2                  OCP MX 8-bit, block 32
``mxfp4``                 mxfp4 (E2M1, blk 32)   mxfp8_e5m2                  OCP MX 4-bit forward
========================  =====================  ==========================  ========================

Common choices, written down so a reader can compare with the paper:

- Every row quantizes the *outputs* of Conv, Linear, BatchNorm and ReLU (``activation``), the
  weights of Conv and Linear (``weight``), and in backward the gradient flowing through each of
  those points (``gradient``) and the gradient of each weight (``weight_gradient``); this is
  precsim's default placement (see :mod:`precsim.qat.prepare`), the paper's layer set.
- Rounding is round-to-nearest-even everywhere (the paper's Table 1 does not use stochastic
  rounding); a YAML scheme can ask for ``rounding: stochastic`` per role.
- Integer rows: activations per tensor with the moving-average min/max observer, weights per
  output channel with min/max (the paper's Qint offers both granularities; per-channel weights
  are the usual QAT choice). Integer gradients take a per-tensor max-abs scale per step.
- ``flexfp8_gs10k`` multiplies every quantized gradient by 10,000 before rounding to 1-5-2 and
  divides afterwards (``scale: 10000``), i.e. the paper's loss scaling with the unscale folded
  into the quantizer.
- ``mxfp4``: the gradients stay in MXFP8 E5M2. Two-bit-exponent, one-bit-mantissa gradients
  with nearest rounding lose most small updates (published FP4 training recipes need
  stochastic rounding and/or random rotations to make that work), so an all-FP4 row would only
  show that; MXFP8 E5M2 backward (the MX spec's 8-bit training recipe) makes the row measure
  what a 4-bit *forward* pass costs.
"""

from __future__ import annotations

import copy
from typing import Any

_INT8_FWD: dict[str, Any] = {
    "activation": {"format": "int8", "observer": "moving_average"},
    "weight": {"format": "int8", "observer": "minmax", "granularity": "per_channel"},
}


def _fwd_bwd(forward: str, backward: str, **grad_opts: Any) -> dict[str, Any]:
    """One format for activations and weights, another for both gradient roles."""
    grad: Any = {"format": backward, **grad_opts} if grad_opts else backward
    return {"activation": forward, "weight": forward, "gradient": grad, "weight_gradient": grad}


BUILTIN_SCHEMES: dict[str, dict[str, Any]] = {
    "fp32": {},
    "qint8": dict(_INT8_FWD),
    "qint8_grad8": {**_INT8_FWD, "gradient": "int8", "weight_gradient": "int8"},
    "bf16": _fwd_bwd("bf16", "bf16"),
    "flexfp8": _fwd_bwd("hfp8_fwd", "hfp8_bwd"),
    "flexfp8_gs10k": _fwd_bwd("hfp8_fwd", "hfp8_bwd", scale=10000),
    "flexfp8_dse": _fwd_bwd("dse(e=4,m=3)", "dse(e=5,m=2)"),
    "mxfp8": _fwd_bwd("mxfp8_e4m3", "mxfp8_e5m2"),
    "mxfp4": _fwd_bwd("mxfp4", "mxfp8_e5m2"),
}

DESCRIPTIONS: dict[str, str] = {
    "fp32": "FP32 baseline (nothing quantized)",
    "qint8": "Qint8 act/weight, FP32 gradients",
    "qint8_grad8": "Qint8 act/weight, Qint8 gradients",
    "bf16": "bfloat16 everywhere",
    "flexfp8": "FlexFP8 fwd 1-4-3 (bias 11) / grad 1-5-2",
    "flexfp8_gs10k": "FlexFP8 1-4-3 / 1-5-2, gradient scaling 10k",
    "flexfp8_dse": "FlexFP8 DSE fwd e4m3 / grad e5m2",
    "mxfp8": "MXFP8 fwd E4M3 / grad E5M2 (block 32)",
    "mxfp4": "MXFP4 fwd E2M1 / grad MXFP8 E5M2",
}

DEFAULT_SCHEMES: tuple[str, ...] = tuple(BUILTIN_SCHEMES)


def builtin_scheme(name: str) -> dict[str, Any]:
    """A deep copy of a built-in scheme's prepare() config (callers may edit it)."""
    if name not in BUILTIN_SCHEMES:
        raise ValueError(f"unknown built-in scheme {name!r}; built-in: {', '.join(BUILTIN_SCHEMES)}")
    return copy.deepcopy(BUILTIN_SCHEMES[name])


def schemes_table() -> str:
    """The built-in schemes as text (for ``precsim sweep --list-schemes``)."""
    width = max(len(n) for n in BUILTIN_SCHEMES)
    return "\n".join(f"{n.ljust(width)}  {DESCRIPTIONS[n]}" for n in BUILTIN_SCHEMES)


__all__ = ["BUILTIN_SCHEMES", "DEFAULT_SCHEMES", "DESCRIPTIONS", "builtin_scheme", "schemes_table"]
