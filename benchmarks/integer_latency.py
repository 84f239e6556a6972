"""Size and CPU latency of the integer model against the FP32 model it came from.

The integer model runs on torch CPU integer ops only (channels-last im2col + int32 matmul,
fixed-point requantization in int64 element-wise ops): torch has no integer conv kernel on
CPU, so this measures what a pure-PyTorch integer reference costs, not what an accelerator or
an optimized int8 library would. For comparison the same integer graph is exported to ONNX and
timed in onnxruntime (ConvInteger/MatMulInteger kernels), and the FP32 model is timed in torch.

    python benchmarks/integer_latency.py [--widths 8,16,32] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import io
import platform
import tempfile
from pathlib import Path

import torch
from _timing import timeit
from torch import nn
from torch.utils.data import DataLoader

import precsim
from precsim.zoo import get_model, load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="8,16,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    widths = tuple(int(w) for w in args.widths.split(","))
    train, test = load_dataset("mnist5k")
    torch.manual_seed(0)
    model = get_model("resnet", in_channels=1, num_classes=10, widths=widths).eval()
    fp32_params = sum(p.numel() * p.element_size() for p in model.parameters())
    fp32_buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    fp32_weights = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fp32_file = buf.tell()

    float_model = get_model("resnet", in_channels=1, num_classes=10, widths=widths).eval()
    float_model.load_state_dict(model.state_dict())
    loader = DataLoader(train, batch_size=128)
    precsim.calibrate(model, loader, precsim.integer_config(model), batches=4)
    imodel = precsim.convert(model)
    weights = sum(op.weight.numel() * op.weight.element_size() for op in imodel.ops if hasattr(op, "weight"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.int.pt"
        imodel.save(path)
        int_file = path.stat().st_size
        onnx_path = Path(tmp) / "m.onnx"
        ort_session = None
        try:
            import onnxruntime as ort

            precsim.export_onnx(imodel, onnx_path, test.tensors[0][:1])
            onnx_file = onnx_path.stat().st_size
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            ort_session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        except ImportError:
            onnx_file = 0

        print(f"zoo ResNet widths {widths} on MNIST 1x28x28; {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}, {args.threads} threads, {datetime.date.today()}")
        print()
        print("| size                                   | FP32      | integer   | ratio |")
        print("|----------------------------------------|-----------|-----------|-------|")
        print(f"| weights (conv/linear)                  | {fp32_weights:>9,} | {weights:>9,} | "
              f"{fp32_weights / weights:.2f}x |")
        print(f"| all parameters vs all integer constants | {fp32_params:>9,} | {imodel.nbytes():>9,} | "
              f"{fp32_params / imodel.nbytes():.2f}x |")
        print(f"| saved file (state_dict vs IntegerModel.save) | {fp32_file:>9,} | {int_file:>9,} | "
              f"{fp32_file / int_file:.2f}x |")
        if onnx_file:
            print(f"| ONNX file (integer graph)              |           | {onnx_file:>9,} |       |")
        print(f"(FP32 buffers, BN running statistics: {fp32_buffers:,} bytes, folded away in the integer model)")
        print()
        print("| batch | FP32 torch (ms) | integer torch (ms) | integer / FP32 | integer ONNX Runtime (ms) |")
        print("|-------|-----------------|--------------------|----------------|---------------------------|")
        for batch in (1, 64):
            x = test.tensors[0][:batch]
            codes = imodel.quantize_input(x)
            with torch.no_grad():
                t_fp32 = timeit(lambda x=x: float_model(x), args.repeats)
            t_int = timeit(lambda codes=codes: imodel.run_integer(codes), args.repeats)
            t_ort = "-"
            if ort_session is not None:
                xn = x.numpy()
                t_ort = f"{timeit(lambda xn=xn: ort_session.run(['output_codes'], {'input': xn}), args.repeats):.2f}"
            print(f"| {batch:>5} | {t_fp32:>15.2f} | {t_int:>18.2f} | {t_int / t_fp32:>13.1f}x | {t_ort:>25} |")


if __name__ == "__main__":
    main()
