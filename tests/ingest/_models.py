"""Tiny sentence-transformers models of any width, for tests that need two embedders."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import minilm_dir


def build_sentence_model(target: Path, hidden: int) -> Path:
    """A 2-layer BERT of width ``hidden`` saved as a sentence-transformers model (random weights)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=512)  # fmt: skip
    raw = target / "hf"
    BertModel(cfg).save_pretrained(raw)
    tok.save_pretrained(raw)
    word = Transformer(str(raw), max_seq_length=128)
    model = SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), pooling_mode="mean")])
    out = target / "wide-model"
    model.save(str(out))
    shutil.rmtree(raw)
    return out
