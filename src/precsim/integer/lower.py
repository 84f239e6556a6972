"""Lower a model with operand points (``points: operands``) to an integer model, from its ``torch.export`` graph.

Where :mod:`precsim.integer.convert` (for models with module-output points) walks a module-level ``torch.fx`` trace of a model written
for it, this walks the ATen graph :func:`~precsim.integer.capture.capture` records from any
model, Hugging Face encoders included. Every op is charged to the innermost module it ran in,
and counted per op kind within that module, exactly as the operand points are named
(``<module>.precsim_operands.<op>_<k>_<operand>``), so each graph node finds its points.

Values while lowering:

* integer data (token ids, the attention mask, shapes): the ATen ops on them are kept as they
  are (:class:`~precsim.integer.text_ops.AtenOp`);
* codes with a per-tensor scale and zero point;
* a GEMM result not yet requantized (a Linear's accumulator, attention's ``P v``): it becomes
  codes where its consumer's point fixes the scale (the next operand point, an ``add`` point,
  GELU's output point), so each product is rounded once, as in the simulation.

The I-BERT mapping: embeddings are int8 tables summed by integer adds; LayerNorm is
I-LayerNorm, GELU I-BERT's i-GELU on a 2^8 finer grid than its output, softmax Shiftmax on the exact
int32 scores with the mask as an integer additive constant; the residual stream is the int16
``add`` points; :class:`~precsim.qat.markers.MeanPool` is an integer mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import Tensor, fx, nn

from precsim.formats import IntFormat
from precsim.integer.capture import capture
from precsim.integer.fixedpoint import INT32_MAX, INT32_MIN, check_requant_rounding, quantize_multiplier
from precsim.integer.gemm import (
    Codes,
    ConversionError,
    PendingConv,
    activation_qparams,
    add_op,
    conv_op,
    source_line,
    weight_codes,
)
from precsim.integer.ibert_ops import prepare_i_gelu
from precsim.integer.ivit_ops import prepare_i_layernorm, prepare_shiftmax
from precsim.integer.model import IntegerModel
from precsim.integer.ops import QParams, RequantOp
from precsim.integer.text_ops import (
    ATEN_OPS,
    AtenOp,
    AttentionProbsOp,
    ConstOp,
    EmbeddingOp,
    FineAddOp,
    IGeluOp,
    MeanPoolOp,
    encode_arg,
)
from precsim.integer.vit_ops import ILayerNormOp, MatMulOp, consts_state
from precsim.qat.markers import MeanPool
from precsim.qat.operands import CONTAINER, batch_broadcast, mode_of
from precsim.qat.quantizer import Quantizer

__all__ = ["FINE_BITS", "lower"]

FINE_BITS = 8  # GEMM results entering an add or GELU are rescaled to a grid 2^8 finer than the output
_SHIFTMAX_BITS = 16
_aten = torch.ops.aten
_IDENTITY = {_aten.dropout.default, _aten.contiguous.default, _aten.alias.default, _aten.clone.default}
_SKIP = {_aten._assert_tensor_metadata.default}
# ATen ops that only move codes: on quantized values they keep codes and scale
_LAYOUT = {"view", "reshape", "_unsafe_view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "contiguous",
           "clone", "slice", "select", "index", "alias", "flatten", "unflatten"}


@dataclass
class _Data:
    """Integer data (ids, masks, positions) or a shape: kept as it is."""

    tensor: str


@dataclass
class _Param:
    """A float parameter or buffer of the model (a weight, a table, LayerNorm's affine)."""

    value: Tensor
    fqn: str


@dataclass
class _Pending:
    """A GEMM result not yet requantized, and the layout ops that wait for it."""

    origin: str
    chain: list[fx.Node] = field(default_factory=list)


@dataclass
class _PendingLinear(_Pending):
    conv: PendingConv | None = None


@dataclass
class _PendingProduct(_Pending):
    a: Codes | None = None
    b: Codes | None = None


Value = _Data | _Param | Codes | _Pending


def _frame(node: fx.Node) -> tuple[str, str]:
    """(fqn, class name) of the innermost module a node ran in ("" for the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    return str(path), kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def _in_module(node: fx.Node, cls: type[nn.Module]) -> str | None:
    """The fqn of the ``cls`` module a node ran in, if any."""
    for path, kind in (node.meta.get("nn_module_stack") or {}).values():
        name = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        if name.endswith(f".{cls.__qualname__}") or name == cls.__qualname__:
            return str(path)
    return None


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _is_float_node(node: Any) -> bool:
    v = _val(node)
    return isinstance(v, Tensor) and v.is_floating_point()


class _Lowering:
    def __init__(self, model: nn.Module, inputs: dict[str, Tensor], rounding: str) -> None:
        mode = mode_of(model)
        if mode is None or not mode.operands:
            raise ConversionError(f"{type(model).__name__} has no operand points: prepare it with points: operands "
                                  "(precsim.ibert_config(model) writes such a config)")
        self.rounding = check_requant_rounding(rounding)
        self.model = model
        self.modules = dict(model.named_modules())
        self.program = capture(model, inputs)
        self.graph = self.program.graph_module.graph
        sig = self.program.graph_signature
        self.params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.user_inputs = [n for n in sig.user_inputs]
        self.values: dict[str, Value] = {}
        self.ops: list[Any] = []
        self.emitted: set[str] = set()
        self.counts: dict[tuple[str, str], int] = {}
        self.notes: list[str] = []
        self.pools: set[str] = set()

    # --- helpers -------------------------------------------------------------------------------
    def emit(self, op: Any) -> None:
        if op.output not in self.emitted:
            self.ops.append(op)
            self.emitted.add(op.output)

    def index(self, node: fx.Node, kind: str) -> tuple[str, int]:
        """(module fqn, index of this call among the module's ``kind`` ops): how the points are named."""
        fqn, _ = _frame(node)
        k = self.counts.get((fqn, kind), 0)
        self.counts[(fqn, kind)] = k + 1
        return fqn, k

    def point(self, fqn: str, key: str) -> Quantizer | None:
        points = getattr(self.modules.get(fqn), CONTAINER, None)
        q = points[key] if points is not None and key in points else None
        return q if isinstance(q, Quantizer) and q.spec is not None else None

    @staticmethod
    def act_qparams(q: Quantizer, where: str) -> QParams:
        qp = activation_qparams(q, where)
        assert qp is not None  # self.point() returns quantizers with a format only
        return qp

    @staticmethod
    def weight_codes(q: Quantizer | None, w: Tensor, where: str,
                     per_tensor: bool = False) -> tuple[Tensor, Tensor, Tensor, IntFormat]:
        if q is None:
            raise ConversionError(f"the weights of {where} are not quantized: give the config a weight role with an "
                                  "integer format such as int8 (precsim.ibert_config does)")
        return weight_codes(q, w, where, per_tensor)

    def value(self, arg: Any, where: str) -> Value:
        if not isinstance(arg, fx.Node):
            raise ConversionError(f"{where}: expected a tensor, got the constant {arg!r}")
        return self.values[arg.name]

    # --- from pending results to codes ---------------------------------------------------------
    def requantized(self, v: Value, qp: QParams, out: str, where: str) -> Codes:
        """``v`` as codes of ``qp``: a requantization of codes, or the pending GEMM made into an integer op."""
        if isinstance(v, Codes):
            if v.qp == qp:
                return v
            m0, shift = quantize_multiplier(v.qp.scale / qp.scale)
            self.emit(RequantOp(where, [v.tensor], out, v.qp, qp, m0, shift, qp.qmin, qp.qmax, self.rounding))
            return Codes(out, qp, where)
        if isinstance(v, _PendingLinear):
            assert v.conv is not None
            self.emit(conv_op(v.conv, qp, f"{out}:gemm", qp.qmin, qp.qmax, self.rounding, self.notes))
            return self.replay(v, Codes(f"{out}:gemm", qp, v.origin), out)
        if isinstance(v, _PendingProduct):
            assert v.a is not None and v.b is not None
            m0, shift = quantize_multiplier(v.a.qp.scale * v.b.qp.scale / qp.scale)
            self.emit(MatMulOp(v.origin, [v.a.tensor, v.b.tensor], f"{out}:gemm", v.a.qp, v.b.qp, qp, m0, shift,
                               qp.qmin, qp.qmax, rounding=self.rounding))
            return self.replay(v, Codes(f"{out}:gemm", qp, v.origin), out)
        _refuse(v, where)

    def replay(self, pending: _Pending, codes: Codes, out: str) -> Codes:
        """The layout ops that waited for a pending result, on its codes."""
        src = codes
        for node in pending.chain:
            name = f"{out}:{node.name}"
            self.emit(self.aten_op(node, {node.args[0].name: src.tensor}, name))  # type: ignore[union-attr]
            src = Codes(name, src.qp, src.origin)
        return src

    def codes(self, v: Value, where: str) -> Codes:
        if isinstance(v, Codes):
            return v
        if isinstance(v, _Pending):
            raise ConversionError(f"the result of {v.origin!r} reaches {where} without being quantized: give it a "
                                  "point (precsim.ibert_config adds one at every such place)")
        _refuse(v, where)

    # --- nodes ---------------------------------------------------------------------------------
    def aten_op(self, node: fx.Node, rename: dict[str, str] | None = None, output: str | None = None) -> AtenOp:
        target = node.target
        packet = getattr(target, "__name__", str(target)).split(".")[0]
        overload = getattr(target, "_overloadname", "default")
        if packet not in ATEN_OPS:
            raise ConversionError(f"cannot convert {node.name} (aten.{packet}, {source_line(node)}): no integer "
                                  f"implementation; supported on codes and integer data: {', '.join(ATEN_OPS)}")
        for key in ("dtype",):
            dt = node.kwargs.get(key)
            if isinstance(dt, torch.dtype) and (dt.is_floating_point or dt.is_complex):
                raise ConversionError(f"cannot convert {node.name} ({source_line(node)}): it makes a {dt} tensor")
        names: list[str] = []
        args = [encode_arg(a, names) for a in node.args]
        kwargs = {k: encode_arg(v, names) for k, v in node.kwargs.items()}
        rename = rename or {}
        inputs = [rename.get(n, n) for n in names]
        return AtenOp(node.name, inputs, output or node.name, f"{packet}.{overload}", args, kwargs)

    def run(self) -> IntegerModel:
        nodes = list(self.graph.nodes)
        out_node = next(n for n in nodes if n.op == "output")
        result = out_node.args[0][0] if isinstance(out_node.args[0], (tuple, list)) else out_node.args[0]
        needed = _ancestors(result)
        for node in nodes:
            if node.name in needed and node.op != "output":
                self.lower(node)
        final = self.values[result.name]
        if isinstance(final, _Pending):
            raise ConversionError(f"the model output (from {final.origin!r}) is not quantized: give it a point")
        if not isinstance(final, Codes):
            raise ConversionError("the model output is not a tensor of codes")
        inputs = [n for n in self.user_inputs if n in needed]
        return IntegerModel(self.ops, inputs[0] if inputs else "", final.tensor, None, final.qp,
                            source=type(self.model).__name__, notes=self.notes, rounding=self.rounding,
                            inputs=inputs)

    def lower(self, node: fx.Node) -> None:
        name = node.name
        if node.op == "placeholder":
            if name in self.params:
                fqn = self.params[name]
                t = self.state[fqn]
                if t.is_floating_point():
                    self.values[name] = _Param(t, fqn)
                else:
                    self.emit(ConstOp(fqn, [], name, t.detach().cpu()))
                    self.values[name] = _Data(name)
            else:
                self.values[name] = _Data(name)
            return
        if node.op != "call_function":
            raise ConversionError(f"cannot convert graph node {name} ({node.op})")
        pool = _in_module(node, MeanPool)
        if pool is not None:
            self.mean_pool(node, pool)
            return
        target = node.target
        if target in _SKIP:
            return
        if target in _IDENTITY:
            self.values[name] = self.value(node.args[0], name)
            return
        handler = {
            _aten.embedding.default: self.embedding,
            _aten.linear.default: self.linear,
            _aten.add.Tensor: self.add,
            _aten.layer_norm.default: self.layer_norm,
            _aten.gelu.default: self.gelu,
            _aten.scaled_dot_product_attention.default: self.attention,
        }.get(target)
        if handler is not None and (target is not _aten.add.Tensor or self.residual(node)):
            self.values[name] = handler(node)
            return
        args = [self.values[a.name] for a in node.all_input_nodes]
        first = args[0] if args else None
        if isinstance(first, _Pending) and all(not isinstance(a, (Codes, _Pending, _Param)) for a in args[1:]):
            self.values[name] = type(first)(**{**first.__dict__, "chain": [*first.chain, node]})
            return
        op_name = getattr(target, "__name__", str(target))
        if any(isinstance(a, (_Pending, _Param)) for a in args):
            raise ConversionError(f"cannot convert {name} (aten.{op_name}, {source_line(node)}): no integer "
                                  "implementation for it on float values")
        if any(isinstance(a, Codes) for a in args) and (not isinstance(first, Codes) or op_name.split(".")[0] not in
                                                         _LAYOUT or any(isinstance(a, Codes) for a in args[1:])):
            raise ConversionError(f"cannot convert {name} (aten.{op_name}, {source_line(node)}): on quantized values "
                                  f"only layout ops keep codes and scale ({', '.join(sorted(_LAYOUT))})")
        if _is_float_node(node):
            raise ConversionError(f"cannot convert {name} (aten.{op_name}, {source_line(node)}): it makes a float tensor "
                                  "from integer data")
        self.emit(self.aten_op(node))
        self.values[name] = Codes(name, first.qp, first.origin) if isinstance(first, Codes) else _Data(name)

    def residual(self, node: fx.Node) -> bool:
        """A float add the simulation gives a point (``_residual_add`` in :mod:`precsim.qat.operands`):
        two non-parameter float tensors of one shape but for size-1 leading axes."""
        if len(node.args) < 2 or not all(_is_float_node(a) for a in node.args[:2]):
            return False
        if any(isinstance(self.values.get(a.name), _Param) for a in node.args[:2]):  # type: ignore[union-attr]
            return False
        a, b = (tuple(d if isinstance(d, int) else str(d) for d in _val(x).shape) for x in node.args[:2])
        return batch_broadcast(a, b)  # symbolic sizes compared by name

    def embedding(self, node: fx.Node) -> Codes:
        table = self.value(node.args[0], node.name)
        fqn, k = self.index(node, "embedding")
        ids = self.value(node.args[1], node.name)
        if not isinstance(table, _Param) or not isinstance(ids, _Data):
            raise ConversionError(f"{fqn}: an embedding needs a parameter table and integer ids")
        codes, scale, zp, _ = self.weight_codes(self.point(fqn, f"embedding_{k}_weight"), table.value,
                                                f"{fqn!r} (embedding)", per_tensor=True)
        fmt = self.point(fqn, f"embedding_{k}_weight").spec.format  # type: ignore[union-attr]
        qp = QParams(float(scale[0]), int(zp[0]), fmt.qmin, fmt.qmax)  # type: ignore[attr-defined]
        self.emit(EmbeddingOp(fqn, [ids.tensor], node.name, codes, qp))
        return Codes(node.name, qp, fqn)

    def linear(self, node: fx.Node) -> _PendingLinear:
        fqn, k = self.index(node, "linear")
        x = self.value(node.args[0], node.name)
        w = self.value(node.args[1], node.name)
        b = self.value(node.args[2], node.name) if len(node.args) > 2 and node.args[2] is not None else None
        if not isinstance(w, _Param):
            raise ConversionError(f"{fqn}: a linear whose weight is not a parameter")
        q_in = self.point(fqn, f"linear_{k}_input")
        src = self.requantized(x, self.act_qparams(q_in, f"{fqn} (input)"), f"{node.name}:in", fqn) if q_in \
            else self.codes(x, fqn)
        codes, w_scale, w_zp, fmt = self.weight_codes(self.point(fqn, f"linear_{k}_weight"), w.value, repr(fqn))
        bias = b.value.detach().double().cpu() if isinstance(b, _Param) else torch.zeros(codes.shape[0],
                                                                                          dtype=torch.float64)
        conv = PendingConv(origin=fqn, module=nn.Linear(1, 1), src=src, weight=codes, w_scale=w_scale,
                            w_zero_point=w_zp, fmt=fmt, bias_real=bias)
        return _PendingLinear(origin=fqn, conv=conv)

    def output_point(self, node: fx.Node, kind: str) -> tuple[str, QParams]:
        fqn, k = self.index(node, kind)
        q = self.point(fqn, f"{kind}_{k}_output")
        if q is None:
            raise ConversionError(f"the output of {kind} in {fqn or 'the model'!r} ({source_line(node)}) is not quantized: "
                                  f"add a rule {{op: {kind}, activation: ...}} (precsim.ibert_config does)")
        return fqn, self.act_qparams(q, f"{fqn} ({kind} output)")

    def fine(self, v: Value, qp: QParams, out: str, where: str) -> Codes:
        """A pending GEMM result as int32 codes on the grid ``S 2^-FINE_BITS`` of ``qp``."""
        grid = QParams(qp.scale * 2.0**-FINE_BITS, 0, INT32_MIN, INT32_MAX)
        return self.requantized(v, grid, out, where)

    def add(self, node: fx.Node) -> Codes:
        fqn, qp = self.output_point(node, "add")
        a, b = (self.value(x, node.name) for x in node.args[:2])
        if isinstance(b, _Pending) and not isinstance(a, _Pending):
            a, b = b, a
        if isinstance(a, _Pending):
            fine = self.fine(a, qp, f"{node.name}:a", fqn)
            cb = self.codes(b, fqn)
            mb, sb = quantize_multiplier(cb.qp.scale / fine.qp.scale)
            self.emit(FineAddOp(fqn, [fine.tensor, cb.tensor], node.name, cb.qp, qp, mb, sb, FINE_BITS,
                                self.rounding))
        else:
            ca, cb = self.codes(a, fqn), self.codes(b, fqn)
            self.emit(add_op(fqn, ca, cb, qp, node.name, qp.qmin, qp.qmax, self.rounding))
        return Codes(node.name, qp, fqn)

    def layer_norm(self, node: fx.Node) -> Codes:
        fqn, qp = self.output_point(node, "layer_norm")
        x = self.codes(self.value(node.args[0], node.name), fqn)
        shape = node.args[1]
        weight = self.value(node.args[2], node.name) if len(node.args) > 2 and node.args[2] is not None else None
        bias = self.value(node.args[3], node.name) if len(node.args) > 3 and node.args[3] is not None else None
        eps = float(node.args[4]) if len(node.args) > 4 else 1e-5
        if len(shape) != 1:  # type: ignore[arg-type]
            raise ConversionError(f"{fqn}: I-LayerNorm normalises the last dimension only")
        in_bits = max(x.qp.qmax.bit_length(), (-x.qp.qmin - 1).bit_length() if x.qp.qmin < 0 else 0) + 1
        try:
            k = prepare_i_layernorm(x.qp.scale, int(shape[0]), qp.scale,  # type: ignore[index]
                                    weight.value.detach().float().cpu() if isinstance(weight, _Param) else None,
                                    bias.value.detach().float().cpu() if isinstance(bias, _Param) else None,
                                    eps=eps, in_bits=max(2, in_bits), out_bits=qp.qmax.bit_length() + 1)
        except ValueError as err:
            raise ConversionError(f"cannot convert {fqn!r}: I-LayerNorm: {err}") from None
        if qp.zero_point != 0:
            raise ConversionError(f"{fqn}: I-LayerNorm writes signed symmetric codes: its output point needs zero "
                                  "point 0 (a signed format such as int8)")
        self.emit(ILayerNormOp(fqn, [x.tensor], node.name, x.qp, qp, consts_state(k)))
        return Codes(node.name, qp, fqn)

    def gelu(self, node: fx.Node) -> Codes:
        fqn, qp = self.output_point(node, "gelu")
        v = self.value(node.args[0], node.name)
        x = self.fine(v, qp, f"{node.name}:in", fqn) if isinstance(v, _Pending) else self.codes(v, fqn)
        if x.qp.zero_point != 0 or qp.zero_point != 0:
            raise ConversionError(f"{fqn}: i-GELU needs symmetric codes (zero point 0) in and out")
        try:
            k = prepare_i_gelu(x.qp.scale, qp.scale, qp.qmax.bit_length() + 1)
        except ValueError as err:
            raise ConversionError(f"cannot convert {fqn!r}: i-GELU: {err}") from None
        self.emit(IGeluOp(fqn, [x.tensor], node.name, x.qp, qp, consts_state(k)))
        return Codes(node.name, qp, fqn)

    def attention(self, node: fx.Node) -> _PendingProduct:
        fqn, k = self.index(node, "attention")
        q_node, k_node, v_node = node.args[:3]
        mask_node = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if node.kwargs.get("is_causal") or (len(node.args) > 5 and node.args[5]):
            raise ConversionError(f"{fqn}: causal attention is not supported by the integer encoder")
        points = {o: self.point(fqn, f"attention_{k}_{o}") for o in "qkpv"}
        missing = [o for o, p in points.items() if p is None]
        if missing:
            raise ConversionError(f"{fqn}: attention operands {', '.join(missing)} are not quantized; give attention "
                                  "a rule {op: attention, activation: uint8} (precsim.ibert_config does)")
        qps = {o: self.act_qparams(p, f"{fqn} (attention {o})") for o, p in points.items()}  # type: ignore[arg-type]
        q = self.requantized(self.value(q_node, fqn), qps["q"], f"{node.name}:q", fqn)
        kk = self.requantized(self.value(k_node, fqn), qps["k"], f"{node.name}:k", fqn)
        v = self.requantized(self.value(v_node, fqn), qps["v"], f"{node.name}:v", fqn)
        inputs = [q.tensor, kk.tensor]
        if mask_node is not None:
            mask = self.value(mask_node, fqn)
            if not isinstance(mask, _Data) or _val(mask_node).dtype != torch.bool:
                raise ConversionError(f"{fqn}: the attention mask must be boolean integer data (an additive float "
                                      "mask has no integer form here)")
            inputs.append(mask.tensor)
        head = _val(q_node).shape[-1]
        scale = node.kwargs.get("scale") or (node.args[6] if len(node.args) > 6 else None)
        factor = float(scale) if scale is not None else 1.0 / math.sqrt(int(head))
        s_scores = q.qp.scale * kk.qp.scale * factor
        try:
            consts = prepare_shiftmax(s_scores, _SHIFTMAX_BITS)
        except ValueError as err:
            raise ConversionError(f"cannot convert {fqn!r}: Shiftmax: {err}") from None
        penalty = 1 << 40  # far below the shift exponential's floor: masked probabilities are exactly 0
        m0, shift = quantize_multiplier(consts.out_scale / qps["p"].scale)
        self.emit(AttentionProbsOp(fqn, inputs, f"{node.name}:p", q.qp, kk.qp, qps["p"], factor,
                                   consts_state(consts), penalty, m0, shift, self.rounding))
        return _PendingProduct(origin=fqn, a=Codes(f"{node.name}:p", qps["p"], fqn), b=v)

    def mean_pool(self, node: fx.Node, fqn: str) -> None:
        """The nodes of one :class:`MeanPool` call: one integer op at its first node, the rest aliases."""
        if fqn in self.pools:
            self.values[node.name] = self.values[f"pool:{fqn}"]
            return
        group = [n for n in self.graph.nodes if _in_module(n, MeanPool) == fqn]
        names = {n.name for n in group}
        outside = [a for n in group for a in n.all_input_nodes if a.name not in names]
        hidden = next((a for a in outside if _is_float_node(a)), None)
        mask = next((a for a in outside if not _is_float_node(a) and isinstance(_val(a), Tensor)), None)
        if hidden is None or mask is None:
            raise ConversionError(f"{fqn}: MeanPool needs the hidden states and the 0/1 mask")
        x = self.codes(self.values[hidden.name], fqn)
        m = self.values[mask.name]
        if not isinstance(m, _Data):
            raise ConversionError(f"{fqn}: MeanPool's mask must be integer data")
        out_qp = QParams(x.qp.scale * 2.0**-FINE_BITS, 0, INT32_MIN, INT32_MAX)
        self.emit(MeanPoolOp(fqn, [x.tensor, m.tensor], f"pool:{fqn}", x.qp, out_qp, FINE_BITS))
        self.pools.add(fqn)
        self.values[f"pool:{fqn}"] = Codes(f"pool:{fqn}", out_qp, fqn)
        self.values[node.name] = self.values[f"pool:{fqn}"]


def _refuse(v: Value, where: str) -> NoReturn:
    """The error for a value that cannot become codes: a float parameter, or integer data."""
    if isinstance(v, _Param):
        raise ConversionError(f"{where}: the float tensor {v.fqn!r} reaches it; an integer model has no float "
                              "tensors (only weights of Linear/Embedding/LayerNorm are converted)")
    raise ConversionError(f"{where}: expects codes, got integer data ({getattr(v, 'tensor', v)!r})")


def _ancestors(node: fx.Node) -> set[str]:
    seen: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        stack.extend(n.all_input_nodes)
    return seen


def lower(model: nn.Module, inputs: dict[str, Tensor], *, rounding: str = "gemmlowp") -> IntegerModel:
    """The integer model of ``model`` (prepared with ``points: operands`` and calibrated or trained),
    captured with ``torch.export`` on the keyword ``inputs`` (one example batch)."""
    return _Lowering(model, dict(inputs), rounding).run()
