"""Tests for precsim.zoo models and layers: shapes, module structure, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from precsim.zoo import MLP, MODELS, Add, MatMul, ResNet, ViT, get_model, load_dataset

INPUTS = {"mnist": (1, 28, 28), "digits": (1, 8, 8), "cifar": (3, 32, 32)}


def _named(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def test_layers() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert torch.equal(Add()(a, a), a + a)
    assert torch.allclose(MatMul()(a, b), a @ b)


# --------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("shape", INPUTS.values(), ids=INPUTS.keys())
def test_mlp_forward_shapes(shape) -> None:
    model = MLP(in_shape=shape, num_classes=7, hidden=(32, 16))
    assert model(torch.randn(5, *shape)).shape == (5, 7)
    names = _named(model)
    assert isinstance(names["flatten"], nn.Flatten)
    assert [n for n, m in names.items() if isinstance(m, nn.Linear)] == ["fc1", "fc2", "fc3"]
    assert [n for n, m in names.items() if isinstance(m, nn.ReLU)] == ["relu1", "relu2"]


def test_mlp_no_hidden_is_linear() -> None:
    model = MLP(in_shape=(1, 8, 8), hidden=())
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


# ------------------------------------------------------------------------ ResNet


@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("shape", INPUTS.values(), ids=INPUTS.keys())
def test_resnet_forward_shapes(shape, activation) -> None:
    model = ResNet(in_channels=shape[0], num_classes=10, activation=activation)
    model.eval()
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_resnet_module_structure() -> None:
    model = ResNet(widths=(8, 16, 32), blocks_per_stage=2)
    names = _named(model)
    expected = {
        "stem.conv": nn.Conv2d,
        "stem.bn": nn.BatchNorm2d,
        "stem.relu": nn.ReLU,
        "layer1.0.conv1": nn.Conv2d,
        "layer1.0.bn1": nn.BatchNorm2d,
        "layer1.0.relu1": nn.ReLU,
        "layer1.0.conv2": nn.Conv2d,
        "layer1.0.bn2": nn.BatchNorm2d,
        "layer1.0.add": Add,
        "layer1.0.relu2": nn.ReLU,
        "layer1.1.relu2": nn.ReLU,
        "layer2.0.shortcut.conv": nn.Conv2d,
        "layer2.0.shortcut.bn": nn.BatchNorm2d,
        "layer3.1.add": Add,
        "pool": nn.AdaptiveAvgPool2d,
        "flatten": nn.Flatten,
        "fc": nn.Linear,
    }
    for name, cls in expected.items():
        assert isinstance(names[name], cls), name
    # Identity shortcuts where the shape is unchanged, projections where it changes.
    assert model.layer1[0].shortcut is None and model.layer2[1].shortcut is None
    assert names["layer2.0.shortcut.conv"].stride == (2, 2)
    assert names["layer2.0.conv1"].stride == (2, 2)
    assert names["layer2.0.shortcut.conv"].kernel_size == (1, 1)
    # Every activation call site is its own module instance, never in place.
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 3 * 2
    assert len({id(m) for m in relus}) == len(relus)
    assert not any(m.inplace for m in relus)
    # Conv layers followed by BN carry no bias.
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet_relu6_variant() -> None:
    model = ResNet(activation="relu6")
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    assert acts and all(isinstance(m, nn.ReLU6) for m in acts)
    assert isinstance(_named(model)["layer1.0.relu1"], nn.ReLU6)
    with pytest.raises(ValueError, match="gelu"):
        ResNet(activation="gelu")


def test_resnet_conv_bn_act_names() -> None:
    model = ResNet(widths=(8, 16), blocks_per_stage=1)
    triples = model.conv_bn_act_names()
    assert triples == [
        ("stem.conv", "stem.bn", "stem.relu"),
        ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu1"),
        ("layer1.0.conv2", "layer1.0.bn2", None),
        ("layer2.0.conv1", "layer2.0.bn1", "layer2.0.relu1"),
        ("layer2.0.conv2", "layer2.0.bn2", None),
        ("layer2.0.shortcut.conv", "layer2.0.shortcut.bn", None),
    ]
    names = _named(model)
    covered = set()
    for conv, bn, act in triples:
        assert isinstance(names[conv], nn.Conv2d) and isinstance(names[bn], nn.BatchNorm2d)
        assert names[conv].out_channels == names[bn].num_features
        assert act is None or isinstance(names[act], nn.ReLU)
        covered |= {conv, bn}
    # Every conv and BN in the model is part of exactly one chain.
    all_conv_bn = {n for n, m in names.items() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))}
    assert covered == all_conv_bn


def test_resnet_forward_matches_manual_functional() -> None:
    """The module graph really is conv-bn-relu / add / relu, nothing hidden."""
    torch.manual_seed(0)
    model = ResNet(widths=(4, 8), in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)

    def cbr(prefix: str, h: torch.Tensor, act: bool = True) -> torch.Tensor:
        conv, bn = model.get_submodule(prefix[0]), model.get_submodule(prefix[1])
        h = bn(conv(h))
        return F.relu(h) if act else h

    h = cbr(("stem.conv", "stem.bn"), x)
    b = "layer1.0."
    h = F.relu(cbr((b + "conv2", b + "bn2"), cbr((b + "conv1", b + "bn1"), h), False) + h)
    b = "layer2.0."
    main = cbr((b + "conv2", b + "bn2"), cbr((b + "conv1", b + "bn1"), h), False)
    h = F.relu(main + cbr((b + "shortcut.conv", b + "shortcut.bn"), h, False))
    expected = model.fc(h.mean(dim=(2, 3)))
    assert torch.allclose(model(x), expected, atol=1e-5)


# --------------------------------------------------------------------------- ViT


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((1, 28, 28), {}),
        ((1, 8, 8), {"image_size": 8, "patch_size": 2}),
        ((3, 32, 32), {"image_size": 32, "in_channels": 3, "dim": 32, "depth": 2}),
    ],
    ids=INPUTS.keys(),
)
def test_vit_forward_shapes(shape, kwargs) -> None:
    model = ViT(num_classes=10, **kwargs)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    n_tokens = (shape[-1] // model.patch_size) ** 2 + 1
    assert model.pos_embed.shape[1] == n_tokens


def test_vit_module_structure() -> None:
    model = ViT(depth=2)
    names = _named(model)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert isinstance(names["patch_embed.proj"], nn.Conv2d)
    assert names["patch_embed.proj"].stride == (4, 4)
    assert isinstance(names["pos_add"], Add)
    for i in range(2):
        b = f"blocks.{i}."
        expected = {
            "norm1": nn.LayerNorm,
            "attn.qkv": nn.Linear,
            "attn.matmul_qk": MatMul,
            "attn.softmax": nn.Softmax,
            "attn.matmul_av": MatMul,
            "attn.proj": nn.Linear,
            "add1": Add,
            "norm2": nn.LayerNorm,
            "mlp.fc1": nn.Linear,
            "mlp.act": nn.GELU,
            "mlp.fc2": nn.Linear,
            "add2": Add,
        }
        for name, cls in expected.items():
            assert isinstance(names[b + name], cls), b + name
        assert names[b + "attn.qkv"].out_features == 3 * 64
        assert names[b + "mlp.fc1"].out_features == 128
    assert isinstance(names["norm"], nn.LayerNorm) and isinstance(names["head"], nn.Linear)
    counts = {cls: sum(isinstance(m, cls) for m in model.modules()) for cls in (MatMul, Add)}
    assert counts == {MatMul: 4, Add: 5}


def test_vit_ops_run_through_modules() -> None:
    """Hooks on the op modules see every intermediate result with the right shape."""
    model = ViT(depth=1, dim=32, heads=4).eval()
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        return lambda mod, inp, out: seen.__setitem__(name, tuple(out.shape))

    for name, m in model.named_modules():
        if isinstance(m, (MatMul, Add, nn.Softmax, nn.GELU, nn.LayerNorm)):
            m.register_forward_hook(record(name))
    model(torch.randn(2, 1, 28, 28))
    assert seen["blocks.0.attn.matmul_qk"] == (2, 4, 50, 50)
    assert seen["blocks.0.attn.softmax"] == (2, 4, 50, 50)
    assert seen["blocks.0.attn.matmul_av"] == (2, 4, 50, 8)
    assert seen["blocks.0.mlp.act"] == (2, 50, 64)
    assert set(seen) >= {"pos_add", "blocks.0.add1", "blocks.0.add2", "norm"}


def test_vit_attention_matches_reference() -> None:
    """The explicit attention equals scaled dot-product attention."""
    torch.manual_seed(0)
    attn = ViT(dim=16, heads=2, depth=1).blocks[0].attn
    x = torch.randn(3, 5, 16)
    q, k, v = attn.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 5, 16)
    assert torch.allclose(attn(x), attn.proj(ref), atol=1e-5)


def test_vit_invalid_config() -> None:
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ViT(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="divisible by heads"):
        ViT(dim=30, heads=4)
    with pytest.raises(ValueError, match="28x28"):
        ViT()(torch.randn(1, 1, 32, 32))


# ---------------------------------------------------------------------- registry


def test_registry_and_get_model() -> None:
    assert MODELS == {"mlp": MLP, "resnet": ResNet, "vit": ViT}
    assert isinstance(get_model("mlp"), MLP)
    model = get_model("resnet", in_channels=3, widths=(8, 16))
    assert isinstance(model, ResNet) and model.stem.conv.in_channels == 3
    assert isinstance(get_model("vit", dim=32, depth=1), ViT)


def test_get_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="alexnet") as exc:
        get_model("alexnet")
    for name in MODELS:
        assert name in str(exc.value)


def test_get_model_bad_kwargs() -> None:
    with pytest.raises(TypeError, match="widht") as exc:
        get_model("resnet", widht=(8,))
    assert "widths" in str(exc.value)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("mlp", num_classes=0)
    with pytest.raises(ValueError, match="widths"):
        get_model("resnet", widths=())


# ---------------------------------------------------------------- training smoke


def test_mlp_trains_on_mnist5k() -> None:
    """One epoch of the default MLP on the real MNIST subset beats 80% test accuracy."""
    torch.manual_seed(0)
    train, test = load_dataset("mnist5k")
    model = get_model("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    model.train()
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    assert acc > 0.8
