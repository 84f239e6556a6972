"""Small reference models for precision experiments.

Every op whose output may need a quantizer is its own ``nn.Module`` instance:
each activation, each residual add (:class:`~precsim.qat.markers.Add`), each
activation-by-activation product (:class:`~precsim.qat.markers.MatMul`), each
softmax and each LayerNorm. precsim attaches quantizers to module outputs and
its integer converter rewrites models module by module, so an inline
``F.relu(x)`` or ``x + y`` would silently escape simulation. For the same
reason no module is ever reused at two call sites and nothing runs in place.

The models are deliberately tiny so that full experiments run on a laptop CPU.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from precsim.qat.markers import Add, MatMul

__all__ = ["MLP", "ResNet", "BasicBlock", "ViT", "MODELS", "get_model"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6}


def _make_activation(activation: str) -> nn.Module:
    try:
        return _ACTIVATIONS[activation]()
    except KeyError:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}"
        ) from None


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# --------------------------------------------------------------------------- MLP


class MLP(nn.Sequential):
    """Flatten -> (Linear -> ReLU) * len(hidden) -> Linear.

    The simplest baseline: only weight and activation quantization matter here,
    which makes it the sanity check for every number format.

    Module names: ``flatten``, ``fc1``, ``relu1``, ``fc2``, ``relu2``, ...; the last
    Linear is ``fc{len(hidden) + 1}`` and has no activation after it.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        hidden: Sequence[int] = (256, 128),
    ) -> None:
        in_features = math.prod(_check_positive_int("in_shape entry", d) for d in in_shape)
        _check_positive_int("num_classes", num_classes)
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = in_features
        for i, h in enumerate(hidden, start=1):
            _check_positive_int("hidden width", h)
            layers[f"fc{i}"] = nn.Linear(width, h)
            layers[f"relu{i}"] = nn.ReLU()
            width = h
        layers[f"fc{len(hidden) + 1}"] = nn.Linear(width, num_classes)
        super().__init__(layers)
        self.in_shape = tuple(in_shape)
        self.num_classes = num_classes


# ------------------------------------------------------------------------ ResNet


def _conv_bn_act(in_ch: int, out_ch: int, stride: int, activation: str) -> nn.Sequential:
    """Conv3x3 -> BN -> act with the names ``conv``, ``bn``, ``relu``."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_ch),
            relu=_make_activation(activation),
        )
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with a residual connection (He et al., 2016).

    Layout (module names in brackets)::

        x -> conv1 -> bn1 -> relu1 -> conv2 -> bn2 --\\
        x -> [shortcut.conv -> shortcut.bn] ---------- add -> relu2

    ``shortcut`` is ``None`` (identity) when the shape is unchanged, otherwise a
    1x1 conv + BN. The activation modules are called ``relu1``/``relu2`` even
    when they are ``nn.ReLU6`` so that names are stable across variants.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = _make_activation(activation)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(out_ch),
                )
            )
        self.add = Add()
        self.relu2 = _make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(self.add(out, identity))


class ResNet(nn.Module):
    """Small CIFAR-style ResNet: stem, ``len(widths)`` stages, global pool, Linear.

    The first stage keeps the resolution; every later stage halves it (stride-2
    first block with a 1x1 conv shortcut), so the default three stages map
    28x28 -> 7x7, 32x32 -> 8x8 and 8x8 -> 2x2. Conv layers have no bias because
    a BatchNorm follows each of them, which is the layout the integer converter
    folds into a single integer conv (see :meth:`conv_bn_act_names`).

    The default widths (16, 32, 64) -- the classic ResNet-20 widths -- with one block
    per stage train one epoch on the 4,000-image MNIST subset in a few seconds on
    two CPU cores.

    Module names: ``stem.{conv,bn,relu}``, ``layer{i}.{j}.{conv1,bn1,relu1,conv2,
    bn2,add,relu2}``, ``layer{i}.{j}.shortcut.{conv,bn}``, ``pool``, ``flatten``, ``fc``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("blocks_per_stage", blocks_per_stage)
        widths = tuple(widths)
        if not widths:
            raise ValueError("widths must contain at least one stage width")
        for w in widths:
            _check_positive_int("widths entry", w)
        _make_activation(activation)  # validate early with a clear message

        self.stem = _conv_bn_act(in_channels, widths[0], 1, activation)
        in_ch = widths[0]
        self.num_stages = len(widths)
        for i, width in enumerate(widths, start=1):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 1 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, width, stride, activation))
                in_ch = width
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)
        self.activation = activation
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[nn.Sequential]:
        """The residual stages ``layer1 .. layerN`` in order."""
        return [getattr(self, f"layer{i}") for i in range(1, self.num_stages + 1)]

    def conv_bn_act_names(self) -> list[tuple[str, str, str | None]]:
        """Names of every ``(conv, bn, activation)`` chain, in forward order.

        The activation is ``None`` where the BN output goes into a residual
        ``add`` instead (``bn2`` and the shortcut BN). Intended for BN folding
        and Conv+BN+ReLU fusion, e.g. ``model.get_submodule(conv_name)``.
        """
        triples: list[tuple[str, str, str | None]] = [("stem.conv", "stem.bn", "stem.relu")]
        for i, stage in enumerate(self.stages(), start=1):
            for j, block in enumerate(stage):
                p = f"layer{i}.{j}"
                triples.append((f"{p}.conv1", f"{p}.bn1", f"{p}.relu1"))
                triples.append((f"{p}.conv2", f"{p}.bn2", None))
                if block.shortcut is not None:
                    triples.append((f"{p}.shortcut.conv", f"{p}.shortcut.bn", None))
        return triples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages():
            x = stage(x)
        return self.fc(self.flatten(self.pool(x)))


# --------------------------------------------------------------------------- ViT


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens via a strided Conv2d (``proj``)."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)


class Attention(nn.Module):
    """Multi-head self-attention written op by op.

    Not ``nn.MultiheadAttention``: that fuses everything into one call, leaving
    no module outputs for the two activation products, the softmax or the
    projections. Here each is a module: ``qkv``, ``matmul_qk``, ``softmax``,
    ``matmul_av``, ``proj``. The ``1/sqrt(head_dim)`` scale is a plain constant
    multiply, which the integer converter folds into the requantization of
    ``matmul_qk``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.matmul_qk = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.matmul_av = MatMul()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Static shape arguments only (unflatten/flatten, no x.shape arithmetic), so torch.fx
        # records plain layout ops that the integer converter can lower.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        scores = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale
        attn = self.softmax(scores)
        out = self.matmul_av(attn, v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Token-wise MLP: ``fc1`` -> ``act`` (GELU) -> ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Pre-norm trains stably without warm-up at this size; the two residual sums
    are ``add1``/``add2`` modules so they get their own quantizers.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.add1 = Add()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        self.add2 = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.add1(x, self.attn(self.norm1(x)))
        return self.add2(x, self.mlp(self.norm2(x)))


def _check_image_size(model: ViT, args: tuple[torch.Tensor, ...]) -> None:
    x = args[0]
    if x.shape[-2:] != (model.image_size, model.image_size):
        raise ValueError(
            f"ViT built for {model.image_size}x{model.image_size} images, got input of shape {tuple(x.shape)}"
        )


class ViT(nn.Module):
    """Tiny Vision Transformer (Dosovitskiy et al., 2021) for small images.

    Included because transformers stress number formats differently from CNNs:
    softmax, LayerNorm, GELU and activation-by-activation products with outliers.

    Module names: ``patch_embed.proj``, ``pos_add``, ``blocks.{i}.{norm1, attn.qkv,
    attn.matmul_qk, attn.softmax, attn.matmul_av, attn.proj, add1, norm2, mlp.fc1,
    mlp.act, mlp.fc2, add2}``, ``norm``, ``head``. The class token and position
    embedding are parameters ``cls_token`` (1, 1, dim) and ``pos_embed``
    (1, num_patches + 1, dim); the head reads the class token only.
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 4,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2,
    ) -> None:
        super().__init__()
        for name, value in [
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
        ]:
            _check_positive_int(name, value)
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if not mlp_ratio > 0 or int(dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be > 0 (and dim * mlp_ratio >= 1), got {mlp_ratio!r}")

        self.image_size = image_size
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, dim)
        num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.pos_add = Add()
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()
        # A pre-hook, not a branch in forward(): hooks are not traced, so torch.fx can trace the
        # dataflow (data-dependent control flow cannot be traced).
        self.register_forward_pre_hook(_check_image_size)

    def _init_weights(self) -> None:
        # Chosen for fast training from scratch on small data (measured on the
        # 4,000-image MNIST subset, Adam 1e-3): a unit-variance position
        # embedding is visible next to O(1) patch tokens from step one, whereas
        # timm's std=0.02 needs hundreds of steps to grow position information;
        # with xavier-uniform Linear weights this roughly doubled 3-epoch accuracy.
        nn.init.normal_(self.pos_embed, std=1.0)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.pos_add(torch.cat([cls, tokens], dim=1), self.pos_embed)
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens[:, 0])


# ---------------------------------------------------------------------- registry

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "resnet": ResNet, "vit": ViT}


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build a zoo model by registry name (``"mlp"``, ``"resnet"``, ``"vit"``).

    Keyword arguments go to the model constructor. Unknown names raise
    ``ValueError``; unknown keyword arguments raise ``TypeError`` listing the
    accepted ones; invalid values raise ``ValueError`` from the constructor.
    """
    try:
        cls = MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}") from None
    sig = inspect.signature(cls.__init__)
    accepted = [p for p in sig.parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"model {name!r} got unexpected keyword argument(s) {unknown}; accepted: {accepted}")
    return cls(**kwargs)
