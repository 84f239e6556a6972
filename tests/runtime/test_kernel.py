"""Compiled kernels called straight into Inductor's code give what torch.compile gives."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import sympy
import torch

from precsim.runtime.kernel import Kernel, _guards_hold, signature


def _affine(x: torch.Tensor, s: torch.Tensor | None, bias: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Several outputs, a None among them, reductions and a per-tensor value."""
    y = x * 2.0 + bias
    scale = None if s is None else s * y.abs().amax()
    return y, None, (y.amin(), scale)


def _run(kernel: Kernel, x: torch.Tensor, *rest: torch.Tensor | None) -> object:
    for d in range(x.dim()):
        torch._dynamo.maybe_mark_dynamic(x, d)
    return kernel((x, *rest), (tuple(range(x.dim())),) + ((),) * len(rest))


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b, strict=True))
    return a is None and b is None


def test_later_calls_go_straight_to_the_compiled_code(requires_compiler: None) -> None:
    """After the first call of a signature (torch.compile's), calls are direct and agree with
    eager on new data and new sizes; a None argument is another signature."""
    k = Kernel(_affine, "affine")
    bias = torch.tensor(0.5)
    for n in (100, 100, 37, 4096):
        x, s = torch.randn(n), torch.tensor(3.0)
        assert _same(_run(k, x, s, bias), _affine(x, s, bias))
    assert len(k._direct) == 1 and next(iter(k._direct.values())) is not None
    x = torch.randn(50)
    assert _same(_run(k, x, None, bias), _affine(x, None, bias))
    assert len(k._direct) == 2 and all(v is not None for v in k._direct.values())


def test_direct_calls_run_inductors_code_checked_on_copies(requires_compiler: None, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Direct calls go below AOTAutograd's wrappers to Inductor's generated code, once that code,
    run on copies of the first call's arguments, gave the first call's bits; code that gives
    other bits keeps the wrappers (here: a stand-in off by one)."""
    from precsim.runtime import kernel

    k = Kernel(_affine, "affine_code")
    bias = torch.tensor(0.5)
    for n in (100, 300):
        x, s = torch.randn(n), torch.tensor(3.0)
        assert _same(_run(k, x, s, bias), _affine(x, s, bias))
    assert next(iter(k._direct.values())).inductor_code  # type: ignore[union-attr]

    found = kernel._inductor_code

    def off_by_one(compiled):  # type: ignore[no-untyped-def]
        code = found(compiled)
        return lambda inputs: [t + 1 for t in code(inputs)]  # type: ignore[misc]

    monkeypatch.setattr(kernel, "_inductor_code", off_by_one)
    k2 = Kernel(_affine, "affine_wrapped")
    for n in (100, 300):
        x, s = torch.randn(n), torch.tensor(3.0)
        assert _same(_run(k2, x, s, bias), _affine(x, s, bias))
    direct = next(iter(k2._direct.values()))
    assert direct is not None and not direct.inductor_code  # type: ignore[attr-defined]


def test_signature_separates_what_guards_check() -> None:
    """Sizes 0, 1 and more, static sizes, dtype, contiguity, shared storage, grad mode, threads."""
    a, b = torch.randn(8, 3), torch.randn(8, 3)
    base = signature((a, b), ((0,), ()))
    assert signature((torch.randn(20, 3), b), ((0,), ())) == base  # a dynamic size: any >= 2
    assert signature((torch.randn(1, 3), b), ((0,), ())) != base
    assert signature((a, torch.randn(8, 4)), ((0,), ())) != base  # a static size
    assert signature((a.double(), b), ((0,), ())) != base
    assert signature((torch.randn(3, 8).t(), b), ((0,), ())) != base
    assert signature((a, a), ((0,), ())) != base  # the same storage twice
    with torch.no_grad():
        assert signature((a, b), ((0,), ())) != base
    assert signature((a, None), ((0,), ())) != base
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # Inductor writes the thread count into its loops
    try:
        assert signature((a, b), ((0,), ())) != base
    finally:
        torch.set_num_threads(threads)


def _passthrough(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * 2.0, y


def _with_break(x: torch.Tensor) -> torch.Tensor:
    y = x * 2.0
    torch._dynamo.graph_break()
    return y + 1.0


def test_what_cannot_be_shown_the_same_keeps_torch_compile() -> None:
    """An output that is an input, or a graph break: no direct call, and still the right result."""
    k = Kernel(_passthrough, "passthrough")
    x, y = torch.randn(64), torch.randn(3)
    for _ in range(2):
        out = _run(k, x, y)
        assert torch.equal(out[0], x * 2.0) and out[1].data_ptr() == y.data_ptr()  # y itself (detached)
    assert list(k._direct.values()) == [None]
    k2 = Kernel(_with_break, "with_break")
    for _ in range(2):
        assert torch.equal(_run(k2, x), x * 2.0 + 1.0)
    assert list(k2._direct.values()) == [None]


def _into(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    top = g.amax()  # an exact reduction: a sum's order differs between eager and compiled
    g.mul_(s)
    return top


def test_direct_calls_write_into_mutated_inputs(requires_compiler: None) -> None:
    k = Kernel(_into, "into")
    for _ in range(3):
        g = torch.randn(256)
        want = g * 3.0
        top = _run(k, g, torch.tensor(3.0))
        assert torch.equal(g, want) and torch.equal(top * 3.0, want.amax())
    assert next(iter(k._direct.values())) is not None


def test_shape_guards_must_hold_for_every_size() -> None:
    s, t = sympy.symbols("s t", integer=True, positive=True)
    assert _guards_hold([s >= 2, s < 2**31])
    assert not _guards_hold([sympy.Eq(s, 128)])  # a specialization
    assert not _guards_hold([s >= 16])
    assert not _guards_hold([s < t])  # two sizes
    assert not _guards_hold(None)


def test_a_compile_that_differs_from_eager_falls_back_to_eager(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A miscompiled kernel (here: off by one ulp) is caught on its first call: a warning, the
    eager result, the arguments as eager leaves them, and eager calls from then on."""
    k = Kernel(_into, "into_wrong")
    backend = k._backend

    def wrong(gm, example_inputs):  # type: ignore[no-untyped-def]
        compiled = backend(gm, example_inputs)

        def run(*args):  # type: ignore[no-untyped-def]
            out = compiled(*args)
            args[-2].add_(1.0)  # the mutated gradient, off
            return out

        return run

    monkeypatch.setattr(k, "_backend", wrong)
    for _ in range(2):
        g = torch.randn(256)
        want = g * 3.0
        with pytest.warns(RuntimeWarning, match="other bits than the eager reference") if _ == 0 else nullcontext():
            top = _run(k, g, torch.tensor(3.0))
        assert torch.equal(g, want) and torch.equal(top * 3.0, want.amax())
    assert list(k._direct.values()) == [None] and len(k._eager) == 1


def test_a_compiler_that_miscompiles_or_fails_means_eager_kernels(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The probe before any kernel compiles: wrong bits, or a compiler that raises, turn the
    compiled kernels off with a warning; the quantizers then give the eager results."""
    import precsim
    from precsim.formats import parse_format
    from precsim.runtime import backend

    def off_by_one_ulp(fn, **kwargs):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            out = fn(*args)
            return (out[0].view(torch.int32).add(1).view(torch.float32), *out[1:])
        return run

    def no_compiler(fn, **kwargs):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            raise RuntimeError("no C++ compiler")
        return run

    x = torch.randn(4096)
    before = backend.compile_enabled()
    try:
        for fake in (off_by_one_ulp, no_compiler):
            backend.compiler_works.cache_clear()
            monkeypatch.setattr(torch, "compile", fake)
            backend.set_compile(True)
            with pytest.warns(RuntimeWarning, match="cannot be used for the rounding kernels"):
                assert not backend.compile_enabled()
            assert torch.equal(precsim.quantize(x, "fp8_e4m3"), parse_format("fp8_e4m3").quantize(x))
            monkeypatch.undo()
    finally:
        backend.compiler_works.cache_clear()
        backend.set_compile(before)
