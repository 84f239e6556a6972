"""Training-step cost: precsim schemes vs the FP32 step, and vs peers, in one process.

Same model (the zoo's ResNet), same MNIST-shaped batch of 128, same optimizer. The ratios are
medians of per-step times, taken side by side. Peers: torch.ao.quantization QAT (deprecated;
here only as a baseline) and QPyTorch when it is installed.

    python benchmarks/train_step.py [--steps 20] [--batch 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import precsim
from precsim.formats.backend import set_compile
from precsim.zoo import get_model

SCHEMES: dict[str, dict | None] = {
    "fp32": None,
    "int8 act+weight, fp32 grad": {"activation": "int8", "weight": "int8"},
    "int8 act+weight+grad": {"activation": "int8", "weight": "int8", "gradient": "int8"},
    "bf16 all": {"activation": "bf16", "weight": "bf16", "gradient": "bf16"},
    "hfp8 1-4-3/1-5-2, SR grad": {"activation": "hfp8_fwd", "weight": "hfp8_fwd",
                                  "gradient": {"format": "hfp8_bwd", "rounding": "stochastic"}},
    "DSE 1-4-3/1-5-2": {"activation": "dse(e=4,m=3)", "weight": "dse(e=4,m=3)", "gradient": "dse(e=5,m=2)"},
    "MXFP8": {"activation": "mxfp8_e4m3", "weight": "mxfp8_e4m3", "gradient": "mxfp8_e5m2"},
}


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def torch_ao_qat(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """torch.ao.quantization FX QAT with its default x86 qconfig (baseline only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (x,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eager", action="store_true", help="precsim's eager reference kernels")
    args = p.parse_args()
    set_compile(not args.eager)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)

    steps: dict[str, Callable[[], None]] = {}
    for name, cfg in SCHEMES.items():
        torch.manual_seed(0)
        model = get_model("resnet").to(args.device)
        if cfg is not None:
            precsim.prepare(model, cfg)
        steps["precsim " + name if cfg else name] = make_step(model, x, y)
    try:
        torch.manual_seed(0)
        steps["peer torch.ao QAT (int8)"] = make_step(torch_ao_qat(get_model("resnet").to(args.device), x), x, y)
    except Exception as err:  # the deprecated peer may not trace every model
        print(f"# torch.ao QAT unavailable: {type(err).__name__}: {err}")
    try:
        import qtorch  # noqa: F401
        print("# QPyTorch is installed but not wired here yet")
    except ImportError:
        print("# QPyTorch not installed: skipped")

    first: dict[str, float] = {}
    for name, step in steps.items():  # warm-up; compile time counted here
        t = time.perf_counter()
        step()
        step()
        first[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):  # interleaved, so drift in machine load hits every scheme alike
        for name, step in steps.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    base = med["fp32"]
    print(f"# ResNet (zoo default), batch {args.batch}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, precsim kernels {'eager' if args.eager else 'compiled'}")
    print(f"{'scheme':34s} {'ms/step':>9s} {'x FP32':>7s} {'warm-up s':>9s}")
    for name in steps:
        print(f"{name:34s} {med[name] * 1e3:9.1f} {med[name] / base:7.2f} {first[name]:9.1f}")


if __name__ == "__main__":
    main()
