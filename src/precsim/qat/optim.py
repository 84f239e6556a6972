"""Optimizer-side simulation: low-precision master weights and optimizer state.

:class:`QuantizedOptimizer` wraps any ``torch.optim.Optimizer``. After each ``step()`` it rounds

- every parameter to ``weight`` (the master copy the hardware would keep, e.g. bf16), and
- every floating-point optimizer state tensor (``momentum_buffer``, ``exp_avg``,
  ``exp_avg_sq``, ...) to ``state``.

Scalar state (0-d tensors such as Adam's ``step`` count) is bookkeeping, not stored data, and is
left alone. For a model from :func:`precsim.prepare` the parameters are the ``.original``
tensors of the weight parametrizations (what ``model.parameters()`` yields), so the stored
weights are rounded here and the forward pass rounds them again to the weight role's format.

Stochastic rounding draws its random bits from ``seed``, a step counter and the tensor's
position, like the quantizers: a run is reproducible and ``state_dict()`` carries the counter,
so a resumed run continues the same stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from precsim.formats import Format, parse_format
from precsim.formats.random import mix_seed, random_bits
from precsim.formats.rounding import check_rounding
from precsim.runtime import quantize

_KEY = "precsim_quantized"


def _format_or_none(what: str, spec: str | Format | None) -> Format | None:
    if spec is None:
        return None
    try:
        fmt = parse_format(spec)
    except ValueError as err:
        raise ValueError(f"QuantizedOptimizer {what}: {err}") from None
    if fmt.state is not None and fmt.state.delayed:
        raise ValueError(f"QuantizedOptimizer {what}: {fmt.name} is delayed, which needs per-tensor history; "
                         "use it without delayed (e.g. dse(...) without delayed=true)")
    if fmt == parse_format("fp32"):  # every float32 value is representable: nothing to round
        return None
    return fmt


class QuantizedOptimizer(Optimizer):
    """``optimizer`` whose parameters and state are rounded to ``weight`` / ``state`` after each step.

    ``weight`` and ``state`` are format specs (``"bf16"``, ``"fp8_e4m3"``, ``"int8"``, ...) or
    formats; ``None`` (or fp32) leaves them in float32. ``rounding`` is ``nearest``,
    ``stochastic`` or ``toward_zero``. ``param_groups``, ``state``, ``zero_grad``,
    ``add_param_group`` and ``defaults`` are the wrapped optimizer's; ``state_dict()`` is the
    wrapped one's plus a ``precsim_quantized`` entry (formats, seed and step counter).
    """

    def __init__(self, optimizer: Optimizer, weight: str | Format | None = None, state: str | Format | None = None,
                 rounding: str = "nearest", seed: int = 0) -> None:
        # Optimizer.__init__ is deliberately not called: every piece of state is the wrapped one's.
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"QuantizedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_rounding(rounding)
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.optimizer = optimizer
        self.weight_format = _format_or_none("weight", weight)
        self.state_format = _format_or_none("state", state)
        self.rounding = rounding
        self.seed = seed
        self.steps = 0

    # --- delegation -------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("step", None)  # an LR scheduler's wrapper of step(): not part of the optimizer
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        w = self.weight_format.name if self.weight_format is not None else "fp32"
        s = self.state_format.name if self.state_format is not None else "fp32"
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"QuantizedOptimizer(weight={w}, state={s}, rounding={self.rounding}, seed={self.seed},\n{inner}\n)"

    # --- stepping ---------------------------------------------------------------------------
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """The wrapped optimizer's step, then rounding of parameters and state."""
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.steps += 1
        self.quantize_()
        return loss

    @torch.no_grad()
    def quantize_(self) -> None:
        """Round every parameter and state tensor in place (``step()`` calls this)."""
        if self.weight_format is None and self.state_format is None:
            return
        index = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                index += 1
                if self.weight_format is not None:
                    p.copy_(self._round(p, self.weight_format, index, 0))
                state = self.optimizer.state.get(p)
                if self.state_format is None or not state:
                    continue
                for k, name in enumerate(sorted(state)):
                    t = state[name]
                    if isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0:
                        t.copy_(self._round(t, self.state_format, index, k + 1))

    def _round(self, t: Tensor, fmt: Format, index: int, slot: int) -> Tensor:
        if self.rounding != "stochastic":
            return quantize(t, fmt, rounding=self.rounding)  # type: ignore[arg-type]
        seed = torch.tensor([mix_seed(self.seed, index, slot), mix_seed(self.seed, self.steps)],
                            dtype=torch.int32, device=t.device)
        return quantize(t, fmt, rounding="stochastic", random_bits=random_bits(t.shape, seed))

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = self.optimizer.state_dict()
        sd[_KEY] = {
            "steps": self.steps,
            "seed": self.seed,
            "rounding": self.rounding,
            "weight": None if self.weight_format is None else self.weight_format.name,
            "state": None if self.state_format is None else self.state_format.name,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        ours = state_dict.pop(_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        if ours is not None:
            self.steps = int(ours["steps"])
            self.seed = int(ours["seed"])


__all__ = ["QuantizedOptimizer"]
