"""IntegerModel: what an integer-only accelerator would run, made from a prepared model.

Floats exist only at the two boundaries: :meth:`IntegerModel.__call__` quantizes the float
input with the input quantizer's scale and zero point (exactly as the simulation did) and
dequantizes the output codes. :meth:`IntegerModel.run_integer` is integers in, integers out.

``IntegerModel.rounding`` is the requantization rounding mode (``"gemmlowp"`` double rounding,
the default, or TFLite's ``"single"`` rounding; :mod:`precsim.integer.fixedpoint`). Every op that
requantizes carries it, and the model checks that they agree, so a saved file, ``describe()``
and the ONNX export all see one mode.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from precsim.integer import text_ops, vit_ops  # noqa: F401  (register the transformer ops with op_from_state)
from precsim.integer.fixedpoint import check_requant_rounding
from precsim.integer.ops import Op, QParams, op_from_state, to_nchw, to_nhwc

__all__ = ["IntegerModel", "describe"]

_FORMAT_VERSION = 3  # 2: requantization rounding mode (files of version 1 are all "gemmlowp"); 3: integer inputs
_READABLE_VERSIONS = (1, 2, 3)
_ROUNDING_TEXT = {
    "gemmlowp": "gemmlowp (SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT: double rounding)",
    "single": "single (TFLite TFLITE_SINGLE_ROUNDING: one rounding of acc M0 2^(shift-31), ties toward +inf)",
}
Record = list[tuple[str, str, Tensor]]


class IntegerModel:
    """A list of integer ops over named tensors, plus the input/output quantization.

    ``notes`` holds what the converter wants users to know (e.g. int64 accumulators).
    ``rounding`` is the requantization mode; every op with a ``rounding`` field must use it.
    """

    def __init__(self, ops: list[Op], input_name: str, output_name: str, input_qp: QParams | None, output_qp: QParams,
                 source: str = "", notes: list[str] | None = None, rounding: str = "gemmlowp",
                 inputs: list[str] | None = None) -> None:
        self.rounding = check_requant_rounding(rounding)
        odd = [f"{op.name} ({op.rounding!r})" for op in ops if getattr(op, "rounding", rounding) != rounding]
        if odd:
            raise ValueError(f"integer model with rounding {rounding!r} has ops that requantize differently: "
                             + ", ".join(odd[:5]))
        if inputs is None and input_qp is None:
            raise ValueError("an integer model needs either the input quantization (input_qp) or integer inputs")
        self.ops, self.input_name, self.output_name = ops, input_name, output_name
        self.input_qp, self.output_qp = input_qp, output_qp
        self.inputs = list(inputs) if inputs is not None else None  # keyword integer inputs (token ids, masks)
        self.source = source
        self.notes = list(notes or [])
        last: dict[str, int] = {}
        for i, op in enumerate(ops):
            for name in op.inputs:
                last[name] = i
        self._last_use = last

    # --- boundaries ----------------------------------------------------------------------------
    def quantize_input(self, x: Tensor) -> Tensor:
        """Float input -> codes: ``clamp(round(x / S) + Z)`` (ties to even, as the simulation)."""
        qp = self.input_qp
        if qp is None:
            raise TypeError(f"this integer model takes integer keyword inputs ({', '.join(self.inputs or [])}), "
                            "not a float tensor")
        q = torch.round(x.detach().float().cpu() / qp.scale_tensor()) + qp.zero_point  # a CPU model
        return torch.clamp(q, qp.qmin, qp.qmax).to(qp.dtype)

    def dequantize_output(self, q: Tensor) -> Tensor:
        """Output codes -> float: ``S (q - Z)``."""
        qp = self.output_qp
        return (q.to(torch.int32) - qp.zero_point).float() * qp.scale_tensor()

    def __call__(self, images: Tensor | None = None, **inputs: Tensor) -> Tensor:
        """Float images (a vision model) or integer keyword inputs (a text model) -> float output."""
        if self.inputs is not None:
            return self.dequantize_output(self.run_integer(**inputs))
        assert images is not None, "an image model takes one float tensor"
        return self.dequantize_output(self.run_integer(self.quantize_input(images)))

    def output_codes(self, images: Tensor | None = None, **inputs: Tensor) -> Tensor:
        """Output codes for float inputs (the integer model's raw answer)."""
        if self.inputs is not None:
            return self.run_integer(**inputs)
        assert images is not None, "an image model takes one float tensor"
        return self.run_integer(self.quantize_input(images))

    # --- execution -----------------------------------------------------------------------------
    def _check_codes(self, x: Tensor, name: str | None = None) -> None:
        if x.dtype.is_floating_point or x.dtype.is_complex or (x.dtype == torch.bool and name is None):
            raise TypeError(f"run_integer takes integer codes{f' for {name!r}' if name else ''}, got {x.dtype}; "
                            "use the model's __call__ for floats")
        qp = self.input_qp
        if name is None and qp is not None and x.numel() and (int(x.min()) < qp.qmin or int(x.max()) > qp.qmax):
            raise ValueError(f"input codes must lie in {qp.qmin}..{qp.qmax} (the input format)")

    def _bind(self, x_codes: Tensor | None, named: dict[str, Tensor], stored: bool) -> dict[str, Any]:
        """The run's first values: the input codes, or the integer keyword inputs (token ids, masks)."""
        if self.inputs is None:
            if x_codes is None or named:
                raise TypeError(f"this integer model takes one tensor of input codes, got {sorted(named) or 'none'}")
            self._check_codes(x_codes)
            assert self.input_qp is not None
            x = x_codes.to(self.input_qp.dtype) if stored else x_codes.to(torch.int64)
            return {self.input_name: to_nhwc(x) if stored else x}
        if x_codes is not None:
            raise TypeError(f"this integer model takes keyword inputs {', '.join(self.inputs)}")
        unknown = sorted(set(named) - set(self.inputs))
        missing = [n for n in self.inputs if n not in named]
        if unknown or missing:
            raise TypeError(f"integer model inputs are {', '.join(self.inputs)}; got unknown {unknown or 'none'}, "
                            f"missing {missing or 'none'}")
        for n, t in named.items():
            self._check_codes(t, n)
        return {n: to_nhwc(t) if stored else t for n, t in named.items()}

    def run_integer(self, x_codes: Tensor | None = None, record: Record | None = None, **inputs: Tensor) -> Tensor:
        """Integer codes in (NCHW like the float input; or the integer keyword inputs of a text
        model), integer codes out.

        ``record``: a list that receives ``(layer, what, tensor)`` for every op output and the
        kernels' accumulators, for inspection (every one is an integer tensor).
        """
        env = self._bind(x_codes, inputs, stored=True)
        if record is not None:
            for name, t in env.items():
                record.append(("input", name, t))
        for i, op in enumerate(self.ops):
            out = op.run(*(env[n] for n in op.inputs), record=record)
            if record is not None and isinstance(out, Tensor):
                record.append((op.name, "output", out))
            for n in op.inputs:
                if self._last_use.get(n) == i and n != self.output_name:
                    env.pop(n, None)
            env[op.output] = out
        return to_nchw(env[self.output_name])

    def run_reference(self, x_codes: Tensor | None = None, **inputs: Tensor) -> Tensor:
        """The same integer maths by the float64 reference kernels (NCHW); returns int64 codes."""
        env = self._bind(x_codes, inputs, stored=False)
        for op in self.ops:
            env[op.output] = op.reference(*(env[n] for n in op.inputs))
        return env[self.output_name]

    # --- size ----------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every constant the integer model keeps (weights, int32 biases, multipliers)."""
        return sum(op.nbytes() for op in self.ops)

    # --- persistence ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "precsim_integer_model": _FORMAT_VERSION,
            "ops": [op.state() for op in self.ops],
            "input_name": self.input_name, "output_name": self.output_name,
            "input_qp": None if self.input_qp is None else self.input_qp.state(), "output_qp": self.output_qp.state(),
            "source": self.source, "notes": list(self.notes), "rounding": self.rounding, "inputs": self.inputs,
        }

    def save(self, path: str | Path) -> None:
        """Save as plain tensors and Python values (loadable with ``torch.load(weights_only=True)``),
        atomically: a crash mid-write leaves the previous file, never a torn one."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self.state(), f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp's is 0600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> IntegerModel:
        version = state.get("precsim_integer_model")
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"not a precsim integer model (format version {version!r}, expected one of "
                             f"{', '.join(map(str, _READABLE_VERSIONS))})")
        ops = [op_from_state(s) for s in state["ops"]]
        iq = state["input_qp"]
        return cls(ops, state["input_name"], state["output_name"], None if iq is None else QParams.from_state(iq),
                   QParams.from_state(state["output_qp"]), state.get("source", ""), state.get("notes", []),
                   state.get("rounding", "gemmlowp"), state.get("inputs"))

    @classmethod
    def load(cls, path: str | Path) -> IntegerModel:
        """The model :meth:`save` wrote to ``path``; a ValueError naming the file if it is not one
        (truncated, garbage, another kind of file)."""
        path = Path(path)
        try:
            state = torch.load(path, weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"{path}: not a readable precsim integer model ({type(err).__name__}: {err}"[:400]
                             + "); write it again with IntegerModel.save (precsim.convert makes the model)") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: not a precsim integer model (it holds a {type(state).__name__})")
        try:
            return cls.from_state(state)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(f"{path}: not a valid precsim integer model: {type(err).__name__}: {err}; "
                             "write it again with IntegerModel.save") from None

    # --- text ----------------------------------------------------------------------------------
    def describe(self) -> str:
        return describe(self)

    def __repr__(self) -> str:
        return (f"IntegerModel({self.source or 'model'}, {len(self.ops)} ops, {self.nbytes()} bytes of constants, "
                f"rounding={self.rounding!r})")


_COLUMNS = ["layer", "op", "in", "weight", "acc", "out", "M0", "n", "Z_in", "Z_w", "Z_out", "S_in", "S_w",
            "S_out", "clamp"]


def describe(imodel: IntegerModel) -> str:
    """Per-layer table of the integer model: dtypes, M0, right shift n (M = M0 2^-31 2^-n), zero points, scales.

    Per-channel values show as ``[min..max]xC``.
    """
    iq = imodel.input_qp
    if iq is None:
        rows = [{"layer": "(input)", "op": "integer inputs: " + ", ".join(imodel.inputs or [])}]
    else:
        rows = [{"layer": "(input)", "op": "quantize", "in": "float32", "out": str(iq.dtype).replace("torch.", ""),
                 "Z_out": str(iq.zero_point), "S_out": f"{iq.scale:.4g}", "clamp": f"{iq.qmin}..{iq.qmax}"}]
    for op in imodel.ops:
        rows.append({"layer": op.name, **op.describe_row()})
    oq = imodel.output_qp
    rows.append({"layer": "(output)", "op": "dequantize", "in": str(oq.dtype).replace("torch.", ""), "out": "float32",
                 "Z_in": str(oq.zero_point), "S_in": f"{oq.scale:.4g}"})
    width = {c: max(len(c), *(len(r.get(c, "-")) for r in rows)) for c in _COLUMNS}
    lines = ["  ".join(c.ljust(width[c]) for c in _COLUMNS), "  ".join("-" * width[c] for c in _COLUMNS)]
    lines += ["  ".join(r.get(c, "-").ljust(width[c]) for c in _COLUMNS) for r in rows]
    lines.append(f"constants: {imodel.nbytes()} bytes")
    lines.append(f"requantization: {_ROUNDING_TEXT[imodel.rounding]}")
    lines += [f"note: {n}" for n in imodel.notes]
    return "\n".join(lines)
