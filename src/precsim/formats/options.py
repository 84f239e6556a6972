"""The options of a format spec, ``name(key=value, ...)``: parsed once, checked by each family."""

from __future__ import annotations


def option_value(text: str) -> int | str | bool | None:
    """``true``/``false``/``none``, an integer, or the text itself."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return int(t)
    except ValueError:
        return t


def parse_options(spec: str, body: str | None) -> dict[str, object]:
    """The ``key=value`` pairs between the parentheses of ``spec``."""
    if not body or not body.strip():
        return {}
    opts: dict[str, object] = {}
    for item in body.split(","):
        if "=" not in item:
            raise ValueError(f"format {spec!r}: option {item.strip()!r} must be key=value")
        k, v = item.split("=", 1)
        opts[k.strip()] = option_value(v)
    return opts


def take(spec: str, opts: dict[str, object], allowed: dict[str, str]) -> dict[str, object]:
    """Rename spec keys to constructor keys, rejecting unknown ones."""
    bad = [k for k in opts if k not in allowed]
    if bad:
        raise ValueError(f"format {spec!r}: unknown option {bad[0]!r}; allowed: {', '.join(allowed)}")
    return {allowed[k]: v for k, v in opts.items()}


def need_int(spec: str, key: str, v: object) -> int:
    """``v`` if it is an integer, else a ValueError naming the option."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"format {spec!r}: {key}={v!r} must be an integer")
    return v


def exponent_mantissa(spec: str, family: str, kw: dict[str, object], optional: str) -> tuple[int, int]:
    """The ``e=`` and ``m=`` a float-like family requires, as integers (taken out of ``kw``)."""
    if "e" not in kw or "m" not in kw:
        raise ValueError(f"format {spec!r}: {family} needs e= and m= (and optionally {optional})")
    return need_int(spec, "e", kw.pop("e")), need_int(spec, "m", kw.pop("m"))
