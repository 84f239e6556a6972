"""Proof 10: model.to(device), torch.compile, DDP."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import precsim
from precsim.qat.observers import Observer
from precsim.qat.quantizer import Quantizer

from ._models import SmallCNN, assert_representable, image_batches, make

CFG = {
    "activation": {"format": "int8", "rounding": "stochastic"},
    "weight": {"format": "int8", "granularity": "per_channel"},
    "gradient": {"format": "fp8_e5m2", "rounding": "stochastic", "scale": "dynamic"},
    "rules": [
        {"match": "conv2", "activation": {"format": "int8", "granularity": "per_channel"}},
        {"match": "bn2", "activation": "dse(e=4,m=3,delayed=true)"},
    ],
}


def _trained(steps: int = 2) -> nn.Module:
    model = precsim.prepare(make(SmallCNN), CFG, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in image_batches(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_state_lives_in_buffers_and_moves_with_the_model() -> None:
    model = _trained()
    for module in model.modules():
        if isinstance(module, (Quantizer, Observer)):
            plain = [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
            assert not plain, (type(module).__name__, plain)
    model.to("meta")
    assert all(b.device.type == "meta" for b in model.buffers())
    assert all(p.device.type == "meta" for p in model.parameters())


def test_to_cpu_keeps_results() -> None:
    model = _trained().eval()
    x = image_batches(1, seed=3)[0][0]
    with torch.no_grad():
        ref = model(x)
        moved = copy.deepcopy(model).to(torch.device("cpu"))
        assert torch.equal(moved(x), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_train_eval_and_cross_device_checkpoint() -> None:
    cpu = _trained()
    gpu = copy.deepcopy(cpu).cuda()
    x, y = image_batches(1, seed=5)[0]
    gpu.train()
    nn.functional.cross_entropy(gpu(x.cuda()), y.cuda()).backward()
    assert all(b.device.type == "cuda" for b in gpu.buffers())
    # a CPU checkpoint loads into a CUDA model and stays on CUDA (per-channel observers included)
    fresh = precsim.prepare(make(SmallCNN), CFG, seed=0).cuda()
    fresh.load_state_dict(cpu.state_dict())
    assert all(b.device.type == "cuda" for b in fresh.buffers())
    fresh.eval()
    cpu.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)
    cap = {}
    for name, q in precsim.quantizers(gpu):
        q.register_forward_hook(lambda m, a, o, name=name: cap.__setitem__(name, (m, o.detach())))
    gpu.eval()
    with torch.no_grad():
        gpu(x.cuda())
    for name, (q, out) in cap.items():
        if q.spec is not None and "bn2" not in name:
            assert_representable(q, out, name)


def test_torch_compile_matches_eager_bit_for_bit() -> None:
    torch._dynamo.reset()
    model = _trained().eval()
    x = image_batches(1, seed=4)[0][0]
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really compiled
    torch._dynamo.reset()


def test_ddp_single_process_matches_plain() -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # An in-memory store: with a file:// store and one process, torch can wait for ever on a
    # store file that it has already removed (pytorch/pytorch#31467); it hung a CI run.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plain = precsim.prepare(make(SmallCNN), CFG, seed=0)
        wrapped = nn.parallel.DistributedDataParallel(precsim.prepare(make(SmallCNN), CFG, seed=0))
        for x, y in image_batches(2):
            for m in (plain, wrapped):
                m.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
            for p, q in zip(plain.parameters(), wrapped.module.parameters(), strict=True):
                assert torch.equal(p.grad, q.grad)
    finally:
        dist.destroy_process_group()
