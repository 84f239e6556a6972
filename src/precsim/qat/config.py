"""QuantConfig: which format each role of each module uses. Data only; prepare() applies it.

A config is a dict (or a YAML file holding one)::

    activation: int8                      # global default per role
    weight: {format: int8, granularity: per_channel, observer: minmax}
    gradient: {format: fp8_e5m2, rounding: stochastic}
    rules:                                # overrides, later rules win
      - {type: Linear, weight: int4}
      - {match: "layer4.*", gradient: bf16}
    bias: int32                           # conv/linear bias as int32 codes at S_in*S_w (bias.py)

``points: operands`` puts the points on the operands of every GEMM-like op instead of on module
outputs (:mod:`precsim.qat.operands`); rules may then select points by ``op`` as well.

``accumulator`` (and ``gradient_accumulator`` for the backward GEMMs), globally or in rules,
holds the sums inside GEMMs in a narrow format (docs/accumulators.md)::

    accumulator: {format: fp16, block: 32, promote: 128}
    rules:
      - {type: Conv2d, accumulator: {format: int16, overflow: wrap}}
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from precsim.formats import Format, parse_format
from precsim.formats.float import FloatFormat
from precsim.formats.rounding import ROUNDINGS
from precsim.qat.observers import OBSERVERS
from precsim.runtime.accumulate import check_blocks

ROLES: tuple[str, ...] = ("activation", "input", "weight", "gradient", "weight_gradient")
GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_channel")
STES: tuple[str, ...] = ("clipped", "plain")
BIASES: tuple[str, ...] = ("fp32", "int32")  # fp32: not quantized; int32: codes at S_in*S_w
POINTS: tuple[str, ...] = ("outputs", "operands")  # module outputs (the paper) or GEMM operands
BLOCK_AXES: tuple[str, ...] = ("reduction", "last")  # where operand blocks run: the GEMM's K, or as for outputs
# op kinds of ``points: operands``: GEMMs, whose operands are points, and the non-GEMM ops an
# integer pipeline rounds, whose outputs are points only where a rule names their op
GEMM_OPS: tuple[str, ...] = ("linear", "conv", "matmul", "einsum", "attention")
OUTPUT_OPS: tuple[str, ...] = ("softmax", "gelu", "silu", "layer_norm", "rms_norm", "add")
# lookups whose table (a weight) is a point where a rule names their op: an integer model stores it in codes
TABLE_OPS: tuple[str, ...] = ("embedding",)
OPS: tuple[str, ...] = GEMM_OPS + OUTPUT_OPS + TABLE_OPS
ACCUMULATED_OPS: tuple[str, ...] = ("linear", "conv", "matmul", "einsum", "attention")  # GEMMs an accumulator can run
_ROLE_KEYS = ("format", "rounding", "observer", "momentum", "percentile", "granularity", "axis", "ste", "scale",
              "delayed")
ACCUMULATORS: tuple[str, ...] = ("accumulator", "gradient_accumulator")  # forward GEMMs, backward GEMMs
CONFIG_KEYS = (*ROLES, *ACCUMULATORS, "rules", "seed", "fold_bn", "bias", "points", "block_axis")  # top-level keys
_RULE_KEYS = ("match", "type", "op", *ROLES, *ACCUMULATORS, "bias")
_ACCUMULATOR_KEYS = ("format", "block", "promote", "rounding", "overflow", "bias")
ACCUMULATOR_OVERFLOWS: tuple[str, ...] = ("wrap", "saturate")  # integer accumulators
ACCUMULATOR_BIASES: tuple[str, ...] = ("after", "before")  # the bias added to the result, or the accumulator's start
_INT_ACCUMULATOR = re.compile(r"^\s*int(\d+)\s*$")


@dataclass(frozen=True)
class RoleSpec:
    """How one role is quantized.

    ``rounding`` applies in ``train()``; ``eval()`` always rounds to nearest. ``observer`` is
    used by integer formats only. ``ste``: ``clipped`` passes no gradient where the input was
    outside the representable range (the default for integer formats), ``plain`` passes it all.
    ``scale`` (gradient roles): a static factor S applied as Q(S g) / S, the same as scaling the
    loss by S and unscaling before the optimizer, or ``"dynamic"``: S is halved on overflow of
    the format and doubled after 1000 steps without one. ``delayed`` (integer formats with a
    minmax, running_minmax or moving_average observer): in ``train()``, quantize with the range
    stored by the previous call and update it from this tensor in the same pass (the first call
    measures first). On a gradient role (per tensor), the range is the previous backward's
    [min, max], as in delayed FP8 scaling.
    """

    format: Format
    rounding: str = "nearest"
    observer: str = "moving_average"
    momentum: float = 0.1
    percentile: float = 99.99
    ste: str = "clipped"
    scale: float | str | None = None
    delayed: bool = False

    @property
    def is_identity(self) -> bool:
        fmt = self.format
        return getattr(fmt, "is_float32", False) and self.scale is None


def _where(ctx: str) -> str:
    return f" (in {ctx})" if ctx else ""


def _keyed(value: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A format string (or Format) or a dict of ``keys`` with a ``format``, as a dict."""
    if isinstance(value, (str, Format)):
        value = {"format": value}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a format string or a dict, got {value!r}")
    bad = [k for k in value if k not in keys]
    if bad:
        raise ValueError(f"{where}: unknown key {bad[0]!r}; allowed: {', '.join(keys)}")
    if "format" not in value:
        raise ValueError(f"{where}: missing 'format'")
    return value


def parse_role(role: str, value: Any, ctx: str = "") -> RoleSpec:
    """A role value (spec string or dict) -> RoleSpec, with errors naming the bad key/value."""
    if isinstance(value, RoleSpec):
        return value
    value = _keyed(value, f"role {role!r}{_where(ctx)}", _ROLE_KEYS)
    try:
        fmt = parse_format(value["format"])
    except ValueError as err:
        raise ValueError(f"role {role!r}{_where(ctx)}: {err}") from None
    rounding = value.get("rounding", "nearest")
    if rounding not in ROUNDINGS:
        raise ValueError(f"role {role!r}{_where(ctx)}: rounding {rounding!r} not allowed; allowed: {', '.join(ROUNDINGS)}")
    observer = value.get("observer", "minmax" if role == "weight" else "moving_average")
    if observer not in OBSERVERS:
        raise ValueError(f"role {role!r}{_where(ctx)}: observer {observer!r} not allowed; allowed: {', '.join(OBSERVERS)}")
    if "observer" in value and role in ("gradient", "weight_gradient"):
        raise ValueError(f"role {role!r}{_where(ctx)}: 'observer' is for forward roles; an integer gradient is "
                         "rounded on its own [min, max] (or, with delayed: true, the previous backward's)")
    granularity = value.get("granularity", "per_tensor")
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"role {role!r}{_where(ctx)}: granularity {granularity!r} not allowed; allowed: {', '.join(GRANULARITIES)}"
        )
    if granularity == "per_channel":
        if not fmt.observed:
            raise ValueError(f"role {role!r}{_where(ctx)}: per_channel needs an integer format, got {fmt.name}")
        axis = value.get("axis", 0 if role in ("weight", "weight_gradient") else 1)
        fmt = dataclasses.replace(fmt, axis=axis, name="")
    ste = value.get("ste", fmt.default_ste)
    if ste not in STES:
        raise ValueError(f"role {role!r}{_where(ctx)}: ste {ste!r} not allowed; allowed: {', '.join(STES)}")
    scale = value.get("scale")
    if scale is not None:
        if role not in ("gradient", "weight_gradient"):
            raise ValueError(f"role {role!r}{_where(ctx)}: 'scale' is for gradient roles only")
        if scale != "dynamic" and not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"role {role!r}{_where(ctx)}: scale {scale!r} not allowed; allowed: a number > 0 or 'dynamic'")
        scale = scale if scale == "dynamic" else float(scale)
    delayed = value.get("delayed", False)
    if not isinstance(delayed, bool):
        raise ValueError(f"role {role!r}{_where(ctx)}: delayed {delayed!r} not allowed; allowed: true, false")
    if delayed and not (fmt.observed and observer != "percentile"):
        raise ValueError(f"role {role!r}{_where(ctx)}: delayed needs an integer format (not grouped) with a "
                         f"minmax, running_minmax or moving_average observer, got {fmt.name} / {observer}")
    if delayed and role in ("gradient", "weight_gradient") and fmt.axis is not None:
        raise ValueError(f"role {role!r}{_where(ctx)}: delayed gradient ranges are per tensor; got per_channel "
                         f"(axis {fmt.axis}); allowed: granularity per_tensor")
    try:
        return RoleSpec(fmt, rounding, observer, float(value.get("momentum", 0.1)),
                        float(value.get("percentile", 99.99)), ste, scale, delayed)
    except (TypeError, ValueError) as err:
        raise ValueError(f"role {role!r}{_where(ctx)}: {err}") from None


@dataclass(frozen=True)
class AccumulatorSpec:
    """How the sums inside a GEMM are held (:mod:`precsim.runtime.accumulate`).

    K is cut into blocks of ``block`` elements summed in float32; the block sums are added in
    order to an accumulator rounded to ``format`` after every add (``rounding``; ``eval()``
    rounds to nearest) or, for an integer accumulator (``bits`` set, ``format`` None), kept in
    ``bits`` bits by ``overflow`` (wrap or saturate), on the operands' integer codes.
    ``promote``: every ``promote`` elements the accumulator moves into a float32 (integers:
    exact) total. ``bias``: ``after`` (added to the result) or ``before`` (the accumulator's
    start)."""

    format: Format | None
    bits: int | None = None
    block: int = 32
    promote: int | None = None
    rounding: str = "nearest"
    overflow: str = "wrap"
    bias: str = "after"

    @property
    def name(self) -> str:
        return f"int{self.bits}" if self.format is None else self.format.name

    def describe(self) -> str:
        """One line for summaries: format, block, promotion, rounding or overflow, bias."""
        parts = [self.name, f"block {self.block}"]
        if self.promote is not None:
            parts.append(f"promote {self.promote}")
        parts.append(self.overflow if self.format is None else self.rounding)
        if self.bias != "after":
            parts.append(f"bias {self.bias}")
        return ", ".join(parts)


def parse_accumulator(key: str, value: Any, ctx: str = "") -> AccumulatorSpec | None:
    """An ``accumulator`` / ``gradient_accumulator`` value (a format string or a dict) ->
    AccumulatorSpec; None for fp32 (float32 sums: the plain GEMM)."""
    if value is None or isinstance(value, AccumulatorSpec):
        return value
    where = f"{key}{_where(ctx)}"
    value = _keyed(value, where, _ACCUMULATOR_KEYS)
    raw = value["format"]
    allowed_formats = ("a scalar float format (fp16, bf16, fp8_e5m2, flexfp(e=,m=), ...) or an integer "
                       "width int8 .. int64")
    match = _INT_ACCUMULATOR.match(raw) if isinstance(raw, str) else None
    fmt: Format | None = None
    bits = None
    if match is not None:
        bits = int(match.group(1))
        if not 8 <= bits <= 64:
            raise ValueError(f"{where}: integer accumulator width {bits} not allowed; allowed: 8..64")
        if key == "gradient_accumulator":
            raise ValueError(f"{where}: format {raw!r} not allowed: gradients have no integer codes; allowed: "
                             "a scalar float format")
    else:
        try:
            fmt = parse_format(raw)
        except ValueError:
            raise ValueError(f"{where}: format {raw!r} not allowed; allowed: {allowed_formats}") from None
        if not isinstance(fmt, FloatFormat):
            raise ValueError(f"{where}: format {fmt.name!r} is not an accumulator format (block, scaled and "
                             f"per-tensor integer formats hold operands, not sums); allowed: {allowed_formats}")
        if fmt.is_float32:
            return None
        if fmt.mantissa_bits > 21 or fmt.min_exponent - fmt.mantissa_bits < -147:
            raise ValueError(f"{where}: format {fmt.name!r} keeps too few float32 bits below it for one exact "
                             "rounding of each add; allowed: at most 21 mantissa bits and a smallest subnormal "
                             ">= 2^-147 (or fp32: float32 sums)")
    block, promote = value.get("block", 32), value.get("promote")
    check_blocks(block, promote, where)
    rounding = value.get("rounding", "nearest")
    if rounding not in ROUNDINGS:
        raise ValueError(f"{where}: rounding {rounding!r} not allowed; allowed: {', '.join(ROUNDINGS)}")
    if bits is not None and "rounding" in value:
        raise ValueError(f"{where}: rounding is for float accumulators (an integer sum is exact); for "
                         f"int{bits} set overflow: {' or '.join(ACCUMULATOR_OVERFLOWS)}")
    overflow = value.get("overflow", "wrap")
    if fmt is not None and "overflow" in value:
        raise ValueError(f"{where}: overflow is for integer accumulators; a float accumulator overflows as its "
                         f"format does ({fmt.name}: {fmt.overflow}, set in the format spec)")
    if overflow not in ACCUMULATOR_OVERFLOWS:
        raise ValueError(f"{where}: overflow {overflow!r} not allowed; allowed: {', '.join(ACCUMULATOR_OVERFLOWS)}")
    bias = value.get("bias", "after")
    if bias not in ACCUMULATOR_BIASES:
        raise ValueError(f"{where}: bias {bias!r} not allowed; allowed: {', '.join(ACCUMULATOR_BIASES)}")
    return AccumulatorSpec(fmt, bits, block, promote, rounding, overflow, bias)


@dataclass(frozen=True)
class Rule:
    """Overrides for modules whose name matches ``match`` (a glob) and/or whose type is ``types``,
    and, with ``points: operands``, for ops of the kinds ``ops``."""

    match: str | None
    types: tuple[str, ...]
    roles: dict[str, RoleSpec | None] = field(hash=False)
    text: str = ""
    bias: str | None = None  # one of BIASES; None: this rule leaves the bias setting alone
    ops: tuple[str, ...] = ()  # op kinds (OPS); empty: every point of the selected modules (adds no output op)
    accumulators: dict[str, AccumulatorSpec | None] = field(default_factory=dict, hash=False)  # keys: ACCUMULATORS

    def selects(self, name: str, module_type: str | tuple[str, ...], op: str | None = None) -> bool:
        """``module_type``: the class name, or the names of its whole MRO (subclasses match).
        ``op``: the op kind of an operand point (None: a module-output point)."""
        if self.match is not None and not fnmatch.fnmatchcase(name, self.match):
            return False
        if self.ops and op not in self.ops:
            return False
        names = (module_type,) if isinstance(module_type, str) else module_type
        return not self.types or any(t in self.types for t in names)


@dataclass(frozen=True)
class QuantConfig:
    """Global role defaults plus ordered rules (later rules win). ``None`` means fp32."""

    roles: dict[str, RoleSpec | None]
    rules: tuple[Rule, ...] = ()
    seed: int = 0
    fold_bn: bool = False  # fold BatchNorm into the preceding conv/linear (Jacob et al. 3.2)
    bias: str = "fp32"  # "int32": conv/linear biases rounded as an integer kernel adds them (bias.py)
    freeze_bn_after: int | None = None  # BN uses frozen running stats after this many training steps
    points: str = "outputs"  # one of POINTS
    block_axis: str = "reduction"  # one of BLOCK_AXES (points: operands)
    accumulators: dict[str, AccumulatorSpec | None] = field(default_factory=dict)  # keys: ACCUMULATORS

    def accumulators_for(self, name: str, types: tuple[str, ...], op: str | None = None
                         ) -> tuple[AccumulatorSpec | None, ...]:
        """(accumulator, gradient accumulator) of a GEMM of module ``name`` (class names
        ``types``; ``op``: the op kind, points: operands): the global keys, then every rule that
        selects it, in order."""
        specs = [self.accumulators.get(k) for k in ACCUMULATORS]
        for rule in self.rules:
            if rule.accumulators and rule.selects(name, types, op):
                specs = [rule.accumulators.get(k, v) for k, v in zip(ACCUMULATORS, specs, strict=True)]
        return tuple(specs)

    @property
    def has_accumulators(self) -> bool:
        """Whether any GEMM may take a simulated accumulator (globally or by a rule)."""
        specs = [*self.accumulators.values(), *(v for r in self.rules for v in r.accumulators.values())]
        return any(v is not None for v in specs)

    @classmethod
    def from_any(cls, config: QuantConfig | dict[str, Any] | str | Path) -> QuantConfig:
        if isinstance(config, QuantConfig):
            return config
        if isinstance(config, (str, Path)):
            path = Path(config)
            if not path.exists():
                raise ValueError(f"config file {str(path)!r} does not exist")
            loaded = yaml.safe_load(path.read_text())
            if not isinstance(loaded, dict):
                raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
            config = loaded
        if not isinstance(config, dict):
            raise ValueError(f"a config is a dict, a YAML path or a QuantConfig, got {type(config).__name__}")
        return cls.from_dict(config)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        bad = [k for k in d if k not in CONFIG_KEYS]
        if bad:
            raise ValueError(f"unknown config key {bad[0]!r}; allowed: {', '.join(CONFIG_KEYS)}")
        roles = {r: _role_or_none(r, d[r]) for r in ROLES if r in d}
        points = _parse_choice("points", d.get("points", "outputs"), POINTS)
        block_axis = _parse_choice("block_axis", d.get("block_axis", "reduction"), BLOCK_AXES)
        rules = []
        raw_rules = d.get("rules") or []
        if not isinstance(raw_rules, list):
            raise ValueError(f"'rules' must be a list, got {type(raw_rules).__name__}")
        for i, raw in enumerate(raw_rules):
            if not isinstance(raw, dict):
                raise ValueError(f"rule {i} must be a dict, got {raw!r}")
            bad = [k for k in raw if k not in _RULE_KEYS]
            if bad:
                raise ValueError(f"rule {i}: unknown key {bad[0]!r}; allowed: {', '.join(_RULE_KEYS)}")
            if "match" not in raw and "type" not in raw and "op" not in raw:
                raise ValueError(f"rule {i}: needs 'match' (a module-name glob), 'type' (a module class name) "
                                 "and/or 'op' (an op kind, with points: operands)")
            types = raw.get("type", ())
            types = (types,) if isinstance(types, str) else tuple(types)
            ctx = f"rule {i}"
            ops = _parse_ops(raw["op"], points, ctx) if "op" in raw else ()
            rule_roles = {r: _role_or_none(r, raw[r], ctx) for r in ROLES if r in raw}
            bias = _parse_bias(raw["bias"], ctx) if "bias" in raw else None
            accs = {k: parse_accumulator(k, raw[k], ctx) for k in ACCUMULATORS if k in raw}
            if ops and any(v is not None for v in accs.values()) and not set(ops) & set(ACCUMULATED_OPS):
                raise ValueError(f"op {ops[0]!r} (in {ctx}) has no accumulator; allowed with accumulator: "
                                 f"{', '.join(ACCUMULATED_OPS)}")
            rules.append(Rule(raw.get("match"), types, rule_roles, text=str(raw), bias=bias, ops=ops,
                              accumulators=accs))
        seed = d.get("seed", 0)
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        fold_bn, freeze_bn_after = _parse_fold_bn(d.get("fold_bn", False))
        bias = _parse_bias(d.get("bias", "fp32"))
        if points == "operands" and ("input" in roles or any("input" in r.roles for r in rules)):
            raise ValueError("role 'input' is for points: outputs (a module's input); with points: operands every "
                             "GEMM operand is a point already: use 'activation'")
        if points == "operands" and (fold_bn or bias != "fp32" or any(r.bias not in (None, "fp32") for r in rules)):
            raise ValueError("fold_bn and bias: int32 need points: outputs (they act on module outputs and "
                             "biases); with points: operands, leave them out")
        accumulators = {k: parse_accumulator(k, d[k]) for k in ACCUMULATORS if k in d}
        return cls(roles, tuple(rules), seed, fold_bn=fold_bn, freeze_bn_after=freeze_bn_after, bias=bias,
                   points=points, block_axis=block_axis, accumulators=accumulators)


def _role_or_none(role: str, value: Any, ctx: str = "") -> RoleSpec | None:
    spec = parse_role(role, value, ctx)
    return None if spec.is_identity else spec


def _parse_choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{key} {value!r} not allowed; allowed: {', '.join(allowed)}")
    return value


def _parse_ops(value: Any, points: str, ctx: str) -> tuple[str, ...]:
    """A rule's ``op``: one op kind or a list of them, each one of :data:`OPS`."""
    ops = (value,) if isinstance(value, str) else value
    if not isinstance(ops, (list, tuple)) or not ops:
        raise ValueError(f"op {value!r} (in {ctx}) not allowed; allowed: one of {', '.join(OPS)} or a list of them")
    for op in ops:
        if op not in OPS:
            raise ValueError(f"op {op!r} (in {ctx}) not allowed; allowed: {', '.join(OPS)}")
    if points != "operands":
        raise ValueError(f"op (in {ctx}) selects operand points: it needs points: operands (this config has "
                         f"points: {points})")
    return tuple(ops)


def _parse_bias(value: Any, ctx: str = "") -> str:
    """``bias``: ``int32`` (rounded to int32 codes at scale S_in*S_w) or ``fp32`` (left as it is)."""
    if not isinstance(value, str) or value not in BIASES:
        raise ValueError(f"bias {value!r}{_where(ctx)} not allowed; allowed: int32 (conv/linear bias rounded to "
                         "int32 codes at scale S_in*S_w, as an integer kernel adds it), fp32 (not quantized)")
    return value


def _parse_fold_bn(value: Any) -> tuple[bool, int | None]:
    """``fold_bn``: true/false, or ``{freeze_after: N}`` (fold; BN statistics frozen after N steps)."""
    if value is None or isinstance(value, bool):
        return bool(value), None
    if isinstance(value, dict):
        bad = [k for k in value if k != "freeze_after"]
        if bad:
            raise ValueError(f"fold_bn: unknown key {bad[0]!r}; allowed: freeze_after")
        n = value.get("freeze_after")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"fold_bn: freeze_after must be an integer >= 0 (training steps), got {n!r}")
        return True, n
    raise ValueError(f"fold_bn must be true, false or {{freeze_after: N}}, got {value!r}")
