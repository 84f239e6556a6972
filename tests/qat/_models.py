"""Small models and checking helpers shared by the QAT tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

import precsim
from precsim.formats import DSEFormat, IntFormat
from precsim.qat.markers import Add
from precsim.qat.quantizer import Quantizer


class ResidualMLP(nn.Module):
    """fc-relu-fc plus a residual add: the add hands one gradient tensor to two branches."""

    def __init__(self) -> None:
        from precsim.qat.markers import Add

        super().__init__()
        self.fc1, self.relu, self.fc2, self.add = nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 96), Add()
        self.head = nn.Linear(96, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.fc1(x))
        return self.head(self.add(self.fc2(h), h))  # h's gradient arrives through both branches


class SmallCNN(nn.Module):
    """conv-bn-relu x2, pool, flatten, linear."""

    def __init__(self, in_ch: int = 1, c1: int = 4, c2: int = 8, classes: int = 10, inplace: bool = False,
                 pool: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2 * pool * pool, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.flatten(self.pool(x)))


class TinyTransformer(nn.Module):
    """Embedding + one pre-norm transformer block written with modules, QuantPoint on residuals."""

    def __init__(self, vocab: int = 20, d: int = 16, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(d, d)
        self.res1 = precsim.QuantPoint()
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)
        self.res2 = precsim.QuantPoint()
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        b, n, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        att = self.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h))
        o = (att @ v).transpose(1, 2).reshape(b, n, d)
        x = self.res1(x + self.proj(o))
        x = self.res2(x + self.fc2(self.gelu(self.fc1(self.ln2(x)))))
        return self.head(x.mean(dim=1))


class MHAModel(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        return self.head(a.mean(dim=1))


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (6, 8, 3)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(sizes[1], sizes[2])

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def make(cls: Callable[..., nn.Module], *args: object, seed: int = 0, **kwargs: object) -> nn.Module:
    """A freshly initialized model: the same seed gives the same weights."""
    torch.manual_seed(seed)
    return cls(*args, **kwargs)


def train_steps(model: nn.Module, batches: list[tuple[Tensor, Tensor]], lr: float = 0.05) -> list[Tensor]:
    """Plain SGD over ``batches``; returns the outputs of every step."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs = []
    for x, y in batches:
        opt.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
        outs.append(out.detach().clone())
    return outs


def image_batches(n: int, batch: int = 8, size: int = 8, ch: int = 1, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, ch, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


# --- capturing quantizer traffic ---------------------------------------------------------------
class Capture:
    """Records each quantizer's output and the gradient its backward hands to earlier layers.

    The gradient is taken with a tensor hook on the quantizer's *input* (the module's own output
    before quantization): that is exactly what the quantizer's backward returns.
    """

    def __init__(self, model: nn.Module) -> None:
        self.out: dict[str, tuple[Quantizer, Tensor]] = {}
        self.grad: dict[str, tuple[Quantizer, Tensor]] = {}
        self.handles = [q.register_forward_hook(self._hook(name)) for name, q in precsim.quantizers(model)]

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(q: Quantizer, args: tuple[Tensor, ...], out: Tensor) -> None:
            self.out[name] = (q, out.detach().clone())
            x = args[0]
            if q.role == "activation" and x.requires_grad:
                x.register_hook(lambda g: self.grad.__setitem__(name, (q, g.detach().clone())))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def assert_representable(q: Quantizer, y: Tensor, where: str = "") -> None:
    """``y`` (a quantizer's output) holds only values of the quantizer's format."""
    assert q.spec is not None
    fmt = q.spec.format
    if isinstance(fmt, IntFormat) and q.observer is not None:
        lo, hi = q.observer.range_for(y)
        scale, zp = fmt.qparams(lo, hi)
        codes = y / scale + zp
        near = torch.round(codes)
        assert (codes - near).abs().max() < 1e-3, f"{where}: not on the integer grid"
        assert near.min() >= fmt.qmin and near.max() <= fmt.qmax, f"{where}: codes out of range"
        again = precsim.quantize(y, fmt, scale=scale, zero_point=zp)
        assert torch.equal(again, y), f"{where}: int re-quantization changed values"
    elif isinstance(fmt, DSEFormat):
        assert not fmt.delayed
        assert torch.equal(precsim.quantize(y, fmt), y), f"{where}: not DSE-representable"
    else:
        assert torch.equal(precsim.quantize(y, fmt), y), f"{where}: not representable in {fmt.name}"


def assert_grad_representable(q: Quantizer, g: Tensor, where: str = "") -> None:
    spec = q.grad_spec
    assert spec is not None
    scale = 1.0 if spec.scale is None else float(q.grad_scale)
    assert torch.isfinite(g).all(), f"{where}: non-finite gradient"
    gs = g * scale  # exact: scales are powers of two here
    assert torch.equal(precsim.quantize(gs, spec.format), gs), f"{where}: gradient not in {spec.format.name}"


class RoundGrad(torch.autograd.Function):
    """Identity forward; backward rounds the error signal with ``precsim.quantize`` (reference)."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt: str, scale: float) -> Tensor:  # type: ignore[override]
        ctx.fmt, ctx.scale = fmt, scale
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return precsim.quantize(g * ctx.scale, ctx.fmt) / ctx.scale, None, None


class Branchy(nn.Module):
    """A small CNN (conv-BN-ReLU, a residual Add, pool, Linear) whose forward() branches on the
    input's rank: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.add = Add()
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        y = self.relu2(self.add(y, self.conv2(y)))
        return self.fc(self.pool(y).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.body(x)
