"""Session-wide fixtures: tiny models built once, one local Ray per test session.

Tiny models are real transformers/sentence-transformers models with random weights and the
packaged MiniLM tokenizer: every code path is the production one, compute is milliseconds.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DOCS = REPO / "samples" / "docs"


def minilm_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (tokenizer source for tiny models)."""
    from ragops.model_registry import resolve_model

    return resolve_model("minilm-l6").locate()


def build_tiny_sentence_model(target: Path, pooling: str = "mean", prompts: dict[str, str] | None = None) -> Path:
    """Save a 2-layer, 32-wide BERT as a sentence-transformers model under ``target``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    raw = target / "hf"
    BertModel(cfg).save_pretrained(raw)
    tok.save_pretrained(raw)
    word = Transformer(str(raw), max_seq_length=128)
    pool = Pooling(word.get_embedding_dimension(), pooling_mode=pooling)
    model = SentenceTransformer(modules=[word, pool], prompts=prompts or {})
    out = target / "st"
    model.save(str(out))
    shutil.rmtree(raw)
    return out


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny mean-pooling sentence embedder (dim 32) saved once per session."""
    return build_tiny_sentence_model(tmp_path_factory.mktemp("tiny-embedder"))


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole test session (started lazily by the tests that need it)."""
    import ray

    from ragops.config import RayConfig
    from ragops.raylocal import ensure_ray

    ensure_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def _memory_span_exporter() -> Any:
    """The SDK's in-memory exporter, installed as this test process's tracer provider (once:
    OpenTelemetry allows one provider per process)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ragops.config import TelemetryConfig
    from ragops.tracking import telemetry

    exporter = InMemorySpanExporter()
    assert telemetry.configure(TelemetryConfig(), "test", exporter=exporter)
    return exporter


@pytest.fixture
def spans(_memory_span_exporter: Any) -> Iterator[Any]:
    """The spans this test's process finishes (an ``InMemorySpanExporter``, emptied first)."""
    _memory_span_exporter.clear()
    yield _memory_span_exporter


@pytest.fixture
def make_settings(tmp_path: Path, tiny_embedder: Path) -> Callable[..., Any]:
    """Settings on a fresh data dir with the tiny embedder; ``--set``-style overrides apply."""
    from ragops.config import load_settings

    def make(*overrides: str, data_dir: Path | None = None) -> Any:
        base = [
            f"embedder.model={tiny_embedder}",
            "ingest.runner=local",
            "ingest.chunker.chunk_tokens=64",
            "ingest.chunker.overlap_tokens=8",
        ]
        return load_settings([], base + list(overrides), data_dir=data_dir or tmp_path / "data", environ={})

    return make


@pytest.fixture
def sample_docs(tmp_path: Path) -> Path:
    """A private copy of a slice of the shipped sample corpus (tests may edit it)."""
    dest = tmp_path / "docs"
    shutil.copytree(SAMPLE_DOCS, dest)
    return dest


# ---------------------------------------------------------------------------------------
# Tiny causal LM (generation, readers)
# ---------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Retrieval-augmented generation answers questions from passages found in a document index.",
    "The capital of France is Paris. The Eiffel Tower was finished in 1889 for the World's Fair.",
    "Qdrant stores vectors; Ray Data embeds documents in parallel and writes them in batches.",
    "A passage is a chunk of a document, numbered in the prompt so that answers can cite it.",
    "Fusion-in-decoder reads every passage with the question and fuses the evidence while decoding.",
    "Café, naïve, Zürich, 東京 and emoji 🙂 exercise multi-byte UTF-8 in byte-level tokens.",
    "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.",
]

TINY_MAX_POSITIONS = 256


def _train_tokenizer() -> Any:
    """A byte-level BPE tokenizer with a ChatML template, trained in ~50 ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=TINY_MAX_POSITIONS,
    )


def build_tiny_llama(out: Path, *, initializer_range: float = 0.02, eos_logit_zero: bool = False) -> Path:
    """Save a random tiny Llama (2 layers, hidden 32) and the real chat tokenizer in ``out``.

    Args:
        initializer_range: Spread of the random weights (wider: more decisive logits).
        eos_logit_zero: Zero EOS's output row, so greedy decoding never stops early.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer()
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=TINY_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if eos_logit_zero:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama plus a real chat tokenizer, saved with save_pretrained.

    Weights wider than the default 0.02 give random logits clear winners, so greedy outputs are
    stable against float noise (batched vs single rows). EOS's logit is then always 0 while the
    best of ~600 random logits is ~+3.5: greedy never ends early, so 'length' and stop-sequence
    tests are exact.
    """
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llm"), initializer_range=0.2, eos_logit_zero=True)


