"""The real pretrained all-MiniLM-L6-v2 (Hugging Face transformers, unmodified) with operand points."""

from __future__ import annotations

import collections
import copy

import pytest
import torch

import precsim
from precsim.zoo.text import embed, load_minilm, sentences, tokenize, topic_sentences


@pytest.fixture(scope="module")
def minilm():  # noqa: ANN201
    model, tokenizer = load_minilm()
    texts = [s for _, s in sentences()]
    return model, tokenizer, texts


def test_the_real_minilm_gets_every_gemm_operand_attention_included(minilm) -> None:  # noqa: ANN001
    base, tokenizer, texts = minilm
    model = copy.deepcopy(base)
    inputs = tokenize(tokenizer, texts[:4], 32)
    precsim.prepare(model, {"points": "operands", "activation": "int8", "weight": "int8",
                            "rules": [{"op": "attention", "activation": "bf16"},
                                      {"match": "encoder.layer.5.*", "activation": "fp32"}]},
                    example_inputs=inputs)
    rows = precsim.summary_rows(model)
    kinds = collections.Counter((r["op"], r["operand"]) for r in rows)
    # 6 layers x (q, k, v, out, up, down) Linear + the pooler; attention's two GEMMs in layers 0-4
    assert kinds[("linear", "weight")] == 37 and kinds[("linear", "input")] == 31
    assert {kinds[("attention", o)] for o in "qkpv"} == {5}
    assert {r["format"] for r in rows if r["op"] == "attention"} == {"bf16"}
    assert not any(r["module"].startswith("encoder.layer.5.") and r["role"] == "activation" for r in rows)


def test_mxfp8_operands_keep_sentence_embeddings_and_calibrate_takes_dict_batches(minilm) -> None:  # noqa: ANN001
    base, tokenizer, texts = minilm
    batches = [tokenize(tokenizer, texts[i:i + 8], 48) for i in range(0, 32, 8)]
    with torch.no_grad():
        reference = torch.cat([embed(base, b) for b in batches])
    mx = precsim.prepare(copy.deepcopy(base), {"points": "operands", "activation": "mxfp8_e4m3",
                                                "weight": "mxfp8_e4m3"})
    int8 = precsim.calibrate(copy.deepcopy(base), batches, {"points": "operands", "activation": "int8",
                                                             "weight": {"format": "int8",
                                                                        "granularity": "per_channel"}})
    int4 = precsim.prepare(copy.deepcopy(base), {"points": "operands", "activation": "int4", "weight": "int4"})
    precsim.calibrate(int4, batches, None)
    cosines = {}
    for name, model in (("mxfp8", mx), ("int8", int8), ("int4", int4)):
        with torch.no_grad():
            cosines[name] = (torch.cat([embed(model, b) for b in batches]) * reference).sum(-1)
    assert cosines["mxfp8"].min() > 0.98 and cosines["int8"].mean() > 0.9
    assert cosines["int4"].mean() < cosines["int8"].mean()  # fewer bits, further from FP32


def test_qat_with_operand_points_and_quantized_gradients_learns(minilm) -> None:  # noqa: ANN001
    """A few steps of the documented loop (benchmarks/transformer_qat.py) on a fixed batch: the
    loss falls, with int8 operands and stochastic fp8 gradients everywhere."""
    base, tokenizer, _ = minilm
    texts, labels, names = topic_sentences(4)
    idx = torch.arange(0, len(texts), max(1, len(texts) // 16))[:16]
    inputs = tokenize(tokenizer, [texts[i] for i in idx], 32)
    y = labels[idx]
    torch.manual_seed(0)
    model = copy.deepcopy(base).train()
    head = torch.nn.Linear(384, len(names))
    precsim.prepare(model, {"points": "operands", "activation": "int8", "weight": "int8",
                            "gradient": {"format": "fp8_e5m2", "rounding": "stochastic"}})
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(embed(model, inputs)) * 20, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
    grads = [q for _, q in precsim.quantizers(model) if q.grad_spec is not None]
    assert len(grads) == len(precsim.quantizers(model)) - 37  # every activation operand rounds its gradient
