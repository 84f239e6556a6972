"""The integer-only model of the real all-MiniLM-L6-v2 (I-BERT): torch.export capture, integer ops, agreement."""

from __future__ import annotations

import collections
import copy
import functools
from dataclasses import dataclass

import pytest
import torch
from test_convert import run_integer_dtypes

import precsim
from precsim.integer.convert import ConversionError
from precsim.integer.model import IntegerModel, describe
from precsim.qat.prepare import summary_rows
from precsim.zoo.text import SentenceEncoder, load_minilm, sentences, tokenize


@dataclass
class Converted:
    fp32: torch.nn.Module
    sim: torch.nn.Module
    imodel: IntegerModel
    test: list[dict[str, torch.Tensor]]


@functools.lru_cache(maxsize=1)
def converted() -> Converted:
    base, tokenizer = load_minilm()
    texts = [s for _, s in sentences()]
    fp32 = SentenceEncoder(base).eval()
    calib = [tokenize(tokenizer, texts[i:i + 16], 48) for i in range(0, 64, 16)]
    test = [tokenize(tokenizer, texts[i:i + 16], 48) for i in range(300, 332, 16)]
    sim = precsim.calibrate(copy.deepcopy(fp32), calib, precsim.ibert_config(fp32))
    return Converted(fp32, sim, precsim.convert(sim, example=calib[0]), test)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_ibert_config_rounds_each_tensor_once() -> None:
    c = converted()
    rows = summary_rows(c.sim)
    by = collections.Counter((r["op"], r["operand"], r["format"]) for r in rows)
    # every Linear weight int8 per channel; only the attention output projections get an input point
    assert by[("linear", "weight", "int8(axis=0)")] == 37  # 6 layers x 6, and the pooler (unused by the embedding)
    inputs = [r["module"] for r in rows if r["op"] == "linear" and r["operand"] == "input"]
    assert len(inputs) == 6 and all(m.endswith("attention.output.dense") for m in inputs)
    assert {by[("attention", o, "uint8")] for o in "qkpv"} == {6}
    assert by[("embedding", "weight", "int8")] == 3
    assert by[("add", "output", "int16")] == 2 + 12  # the embedding sums and the residual stream
    assert by[("layer_norm", "output", "int8")] == 13 and by[("gelu", "output", "int8")] == 6


def test_ibert_config_widths() -> None:
    fp32 = converted().fp32
    rules = precsim.ibert_config(fp32, layer_norm="int16", gelu={"format": "int16"})["rules"]
    assert {"op": "layer_norm", "activation": "int16"} in rules and {"op": "gelu", "activation": {"format": "int16"}} in rules
    assert {"op": "add", "activation": "int16"} in rules and {"op": "attention", "activation": "uint8"} in rules


def test_minilm_lowers_to_integer_bert_ops() -> None:
    imodel = converted().imodel
    kinds = collections.Counter(type(op).__name__ for op in imodel.ops)
    assert kinds["EmbeddingOp"] == 3 and kinds["AttentionProbsOp"] == 6 and kinds["MatMulOp"] == 6
    assert kinds["ILayerNormOp"] == 13 and kinds["IGeluOp"] == 6 and kinds["MeanPoolOp"] == 1
    assert kinds["FineAddOp"] == 12 and kinds["AddOp"] == 2 and kinds["ConvOp"] == 36
    assert imodel.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert imodel.input_qp is None
    residual = [op for op in imodel.ops if type(op).__name__ in ("FineAddOp", "AddOp")]
    assert {op.out_qp.dtype for op in residual} == {torch.int16}


def test_any_batch_and_length_and_only_integer_tensors() -> None:
    c = converted()
    b = {k: v[:5, :21] for k, v in c.test[0].items()}  # the export's batch and length were 16 and 48
    record, seen = run_integer_dtypes(c.imodel, **b)
    assert len(record) > len(c.imodel.ops)
    assert not [(layer, what, r.dtype) for layer, what, r in record if r.dtype.is_floating_point]
    assert seen and not [d for d in seen if d.is_floating_point or d.is_complex]
    assert record[-1][2].shape == (5, 384)


def test_integer_kernels_equal_their_reference_code_for_code() -> None:
    c = converted()
    b = {k: v[:4] for k, v in c.test[0].items()}
    assert torch.equal(c.imodel.run_integer(**b).to(torch.int64), c.imodel.run_reference(**b))


def test_sentence_embeddings_agree_with_fp32_and_the_simulation() -> None:
    """Measured (benchmarks/ibert.py has the full table): the embedding sum and its I-LayerNorm
    equal the simulation code for code; the sentence embeddings stay close to both. Floors,
    with margin, of what the PTQ model reaches here; the issue's 0.99/0.995 targets are not met
    (see docs/integer.md for the per-layer errors that say why)."""
    c = converted()
    with torch.no_grad():
        ref = torch.cat([c.fp32(**b) for b in c.test])
        sim = torch.cat([c.sim(**b) for b in c.test])
    out = torch.cat([c.imodel(**b) for b in c.test])
    assert _cos(sim, ref).mean() > 0.95
    assert _cos(out, ref).mean() > 0.94 and _cos(out, sim).mean() > 0.93
    rec: list[tuple[str, str, torch.Tensor]] = []
    b = c.test[0]
    c.imodel.run_integer(record=rec, **b)
    got = next(t for name, what, t in rec if name == "encoder.embeddings.LayerNorm" and what == "output")
    seen: dict[str, torch.Tensor] = {}
    ln = dict(c.sim.named_modules())["encoder.embeddings.LayerNorm"]
    hook = ln.register_forward_hook(lambda m, i, o: seen.__setitem__("ln", o))
    with torch.no_grad():
        c.sim(**b)
    hook.remove()
    op = next(op for op in c.imodel.ops if op.name == "encoder.embeddings.LayerNorm")
    codes = torch.round(seen["ln"] / op.out_qp.scale)
    assert ((got.float() - codes).abs() <= 1).all() and (got.float() == codes).float().mean() > 0.99


def test_save_load_and_describe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    c = converted()
    path = tmp_path / "minilm.int"
    c.imodel.save(path)
    loaded = IntegerModel.load(path)
    b = {k: v[:3] for k, v in c.test[1].items()}
    assert torch.equal(loaded.run_integer(**b), c.imodel.run_integer(**b))
    text = describe(loaded)
    assert text == describe(c.imodel)
    for word in ("embedding (30522x384)", "attention scores + mask, shiftmax", "i-layernorm",
                 "i-gelu", "mean pool", "integer inputs: input_ids, attention_mask, token_type_ids"):
        assert word in text
    fp32_bytes = sum(p.numel() * p.element_size() for p in c.fp32.parameters())
    assert loaded.nbytes() < 0.3 * fp32_bytes


def test_clear_errors() -> None:
    c = converted()
    with pytest.raises(ConversionError, match="example keyword inputs"):
        precsim.convert(c.sim)
    with pytest.raises(TypeError, match="missing \\['attention_mask'\\]"):
        c.imodel.run_integer(input_ids=c.test[0]["input_ids"], token_type_ids=c.test[0]["token_type_ids"])
    cfg = precsim.ibert_config(c.fp32)
    cfg["rules"] = [r for r in cfg["rules"] if r.get("op") != "gelu"]
    calib = [{k: v[:4] for k, v in c.test[0].items()}]
    no_gelu = precsim.calibrate(copy.deepcopy(c.fp32), calib, cfg)
    with pytest.raises(ConversionError, match=r"output of gelu in '.*intermediate.intermediate_act_fn'"):
        precsim.convert(no_gelu, example=calib[0])


class _Scaled(torch.nn.Module):
    """Token ids -> embedding -> LayerNorm -> times 3: a float op on quantized values."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.emb(input_ids)) * 3


def test_a_float_op_on_codes_is_refused_by_name() -> None:
    model = _Scaled().eval()
    batch = {"input_ids": torch.randint(0, 50, (4, 6))}
    cfg = {"points": "operands", "rules": [{"op": "embedding", "weight": "int8"},
                                            {"op": "layer_norm", "activation": "int8"}]}
    precsim.calibrate(model, [batch], cfg)
    with pytest.raises(ConversionError, match=r"aten\.mul\.Tensor.*only layout ops keep codes"):
        precsim.convert(model, example=batch)
