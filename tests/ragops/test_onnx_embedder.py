"""embedder.backend: onnx — export, int8 quantization, cache, and parity with the torch backend.

Thresholds for the tiny random model are what it really reaches: the float32 export equals
torch to 1e-4, and int8 keeps cosine >= 0.95 (a random 32-wide model has no structure for
quantization to preserve, unlike trained weights; the packaged MiniLM test asks for 0.99).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from ragops import onnx_embedder as oe
from ragops.config import EmbedderConfig, load_settings
from ragops.embeddings import TextEmbedder
from ragops.errors import ConfigError
from tests.conftest import build_tiny_sentence_model


TEXTS = [
    "How do I open a file for reading?",
    "  leading and trailing spaces  ",
    "x",
    "The asyncio event loop runs coroutines and callbacks. " * 30,  # longer than max_seq_length
    "Café, naïve, Zürich, 東京 exercise multi-byte text.",
]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _cfg(model: Path, cache: Path, **kw: object) -> EmbedderConfig:
    return EmbedderConfig(model=str(model), backend="onnx", onnx_cache_dir=str(cache), **kw)


@pytest.fixture(scope="module")
def cls_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLS-pooling model with a query prompt (the BGE shape)."""
    return build_tiny_sentence_model(tmp_path_factory.mktemp("tiny-cls"), pooling="cls", prompts={"query": "query: "})


@pytest.mark.parametrize("which", ["mean", "cls"])
def test_float32_export_matches_sentence_transformers(which: str, tiny_embedder: Path, cls_embedder: Path, tmp_path: Path) -> None:
    """Without quantization the ONNX graph plus numpy pooling is sentence-transformers, exactly."""
    from sentence_transformers import SentenceTransformer

    src = tiny_embedder if which == "mean" else cls_embedder
    manifest = oe.export_onnx(src, tmp_path, quantize=False)
    assert manifest["pooling"] == [which] and manifest["quantized"] is False
    model = oe.OnnxSentenceModel(src, tmp_path, manifest)
    st = SentenceTransformer(str(src), device="cpu")
    for prompt in (None, "query: "):
        ref = st.encode(TEXTS, prompt=prompt, batch_size=2, normalize_embeddings=True)
        got = model.encode(TEXTS, prompt=prompt, batch_size=2, normalize_embeddings=True)
        np.testing.assert_allclose(got, ref, atol=1e-4)
    raw = model.encode(TEXTS, batch_size=3)  # unnormalized too (pooling alone)
    np.testing.assert_allclose(raw, st.encode(TEXTS, batch_size=3), atol=1e-4)


def test_int8_backend_is_close_to_torch(tiny_embedder: Path, tmp_path: Path) -> None:
    torch_emb = TextEmbedder(EmbedderConfig(model=str(tiny_embedder)))
    onnx_emb = TextEmbedder(_cfg(tiny_embedder, tmp_path))
    a, b = torch_emb.encode_passages(TEXTS), onnx_emb.encode_passages(TEXTS)
    assert b.dtype == np.float32 and b.shape == a.shape
    assert _cos(a, b).min() >= 0.95
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert onnx_emb.backend == "onnx-int8" and torch_emb.backend == "torch"
    assert onnx_emb.identity == torch_emb.identity  # same vector space: same identity
    assert onnx_emb.encode_passages([]).shape == (0, 32)


def test_interface_matches_torch(tiny_embedder: Path, tmp_path: Path) -> None:
    torch_emb = TextEmbedder(EmbedderConfig(model=str(tiny_embedder)))
    onnx_emb = TextEmbedder(_cfg(tiny_embedder, tmp_path))
    assert onnx_emb.dim == torch_emb.dim == 32
    assert onnx_emb.max_tokens == torch_emb.max_tokens == 128
    assert onnx_emb.count_tokens(TEXTS[0]) == torch_emb.count_tokens(TEXTS[0])
    assert onnx_emb.tokenizer(TEXTS[0])["input_ids"] == torch_emb.tokenizer(TEXTS[0])["input_ids"]
    short = TextEmbedder(_cfg(tiny_embedder, tmp_path, max_seq_length=16))
    assert short.max_tokens == 16
    # Truncation at 16 tokens: two texts equal in their first 16 tokens embed the same.
    v = short.encode_passages(["word " * 40, "word " * 60])
    np.testing.assert_allclose(v[0], v[1], atol=1e-6)


def test_query_instruction_applied(cls_embedder: Path, tmp_path: Path) -> None:
    """The model's own query prompt (and a configured one) prefixes queries only."""
    emb = TextEmbedder(_cfg(cls_embedder, tmp_path))
    assert emb.query_instruction == "query: "
    q = emb.encode_queries(["what is a coroutine"])
    np.testing.assert_allclose(q, emb.encode_passages(["query: what is a coroutine"]), atol=1e-6)
    assert not np.allclose(q, emb.encode_passages(["what is a coroutine"]), atol=1e-3)
    custom = TextEmbedder(_cfg(cls_embedder, tmp_path, query_instruction="Represent: "))
    np.testing.assert_allclose(custom.encode_queries(["x y"]), custom.encode_passages(["Represent: x y"]), atol=1e-6)


def test_second_load_reuses_the_cache(tiny_embedder: Path, tmp_path: Path) -> None:
    before = oe.EXPORTS
    first = TextEmbedder(_cfg(tiny_embedder, tmp_path))
    v1 = first.encode_passages(TEXTS)
    assert oe.EXPORTS == before + 1
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "model.onnx").is_file()
    mtime = (entries[0] / "model.onnx").stat().st_mtime_ns
    second = TextEmbedder(_cfg(tiny_embedder, tmp_path))
    np.testing.assert_array_equal(second.encode_passages(TEXTS), v1)
    assert oe.EXPORTS == before + 1
    assert (entries[0] / "model.onnx").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".locks"]  # no temp leftovers


def test_concurrent_loads_export_once(tiny_embedder: Path, tmp_path: Path) -> None:
    before = oe.EXPORTS
    errors: list[BaseException] = []

    def load() -> None:
        try:
            TextEmbedder(_cfg(tiny_embedder, tmp_path)).warm_up()
        except BaseException as exc:  # noqa: BLE001 - collected for the assert
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and oe.EXPORTS == before + 1


def _load_in_subprocess(model: str, cache: str) -> tuple[int, int]:
    import os

    from ragops import onnx_embedder

    TextEmbedder(EmbedderConfig(model=model, backend="onnx", onnx_cache_dir=cache)).warm_up()
    return os.getpid(), onnx_embedder.EXPORTS


@pytest.mark.slow
def test_concurrent_processes_export_once(tiny_embedder: Path, tmp_path: Path) -> None:
    """Ray actors on one node starting together: one process exports, the others reuse it."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_load_in_subprocess, [(str(tiny_embedder), str(tmp_path))] * 3, chunksize=1)
    per_process: dict[int, int] = {}
    for pid, n in results:  # a worker may run two of the loads: count each process once
        per_process[pid] = max(per_process.get(pid, 0), n)
    assert sum(per_process.values()) == 1
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1


def test_corrupt_cache_is_rebuilt(tiny_embedder: Path, tmp_path: Path) -> None:
    ref = TextEmbedder(_cfg(tiny_embedder, tmp_path)).encode_passages(TEXTS)
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    (entry / "model.onnx").write_bytes(b"truncated")
    before = oe.EXPORTS
    again = TextEmbedder(_cfg(tiny_embedder, tmp_path)).encode_passages(TEXTS)
    assert oe.EXPORTS == before + 1
    np.testing.assert_allclose(again, ref, atol=1e-6)
    assert oe._valid(entry) is not None


def test_cache_key_follows_the_model_files(tiny_embedder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(tiny_embedder, copy)
    assert oe.source_hash(copy) == oe.source_hash(tiny_embedder)  # content, not location
    (copy / "config_sentence_transformers.json").write_text('{"prompts": {"query": "changed: "}}')
    assert oe.source_hash(copy) != oe.source_hash(tiny_embedder)


def test_cache_root_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAGOPS_ONNX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert oe.cache_root() == tmp_path / "xdg" / "ragops" / "onnx"
    monkeypatch.setenv("RAGOPS_ONNX_CACHE", str(tmp_path / "env"))
    assert oe.cache_root() == tmp_path / "env"
    assert oe.cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"


def test_session_threads_follow_torch(tiny_embedder: Path, tmp_path: Path) -> None:
    """Under Ray, torch's thread count is the actor's CPUs: ONNX Runtime takes the same."""
    import torch

    model = TextEmbedder(_cfg(tiny_embedder, tmp_path)).model
    assert model.session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    entry, manifest = oe.ensure_exported(tiny_embedder, tmp_path)
    one = oe.OnnxSentenceModel(tiny_embedder, entry, manifest, threads=1)
    assert one.session.get_session_options().intra_op_num_threads == 1


def test_embed_stage_threads_reach_the_session(tiny_embedder: Path, tmp_path: Path) -> None:
    """A Ray actor's CPU reservation (EmbedStage torch_threads) also caps ONNX Runtime."""
    import torch

    from ragops.config import SparseConfig
    from ragops.ingest.embed import EmbedStage

    before = torch.get_num_threads()
    try:
        stage = EmbedStage(_cfg(tiny_embedder, tmp_path), SparseConfig(), torch_threads=1)
        out = stage({"embed_text": ["a chunk", "another chunk"], "kind": ["chunk", "chunk"]})
        assert out["vector"].shape == (2, 32)
        assert stage.embedder.model.session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(before)


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="backend"):
        EmbedderConfig(backend="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="CPU only"):
        EmbedderConfig(backend="onnx", device="cuda")
    assert EmbedderConfig(backend="onnx", device="auto").backend == "onnx"
    f = tmp_path / "c.yaml"
    cache = tmp_path / "onnx-cache"
    f.write_text(f"embedder:\n  backend: onnx\n  onnx_cache_dir: {cache}\n")
    s = load_settings([f], environ={})
    assert s.embedder.backend == "onnx" and s.embedder.onnx_cache_dir == str(cache)
    with pytest.raises(ConfigError, match="backend"):
        load_settings([], ["embedder.backend=int4"], environ={})


def test_missing_onnxruntime_is_a_clear_error(tiny_embedder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match="pip install 'onnxruntime"):
        TextEmbedder(_cfg(tiny_embedder, tmp_path)).warm_up()


def test_models_with_other_heads_are_refused(tiny_embedder: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    st = SentenceTransformer(str(tiny_embedder), device="cpu")
    st.append(Dense(32, 8))
    st.save(str(tmp_path / "dense"))
    with pytest.raises(ConfigError, match="Dense"):
        TextEmbedder(_cfg(tmp_path / "dense", tmp_path / "cache")).warm_up()


def test_ingest_report_records_the_backend(make_settings, sample_docs: Path, tmp_path: Path) -> None:
    from ragops.ingest.pipeline import run_ingest
    from ragops.manifest import read_records

    s = make_settings("embedder.backend=onnx", f"embedder.onnx_cache_dir={tmp_path / 'onnx'}")
    report = run_ingest(s, [str(sample_docs)])
    assert report.ok and report.points_written > 0
    assert report.to_dict()["embedder_backend"] == "onnx-int8"
    records = read_records(s.data_dir, report.collection)
    assert records and records[-1]["embedder_backend"] == "onnx-int8"


@pytest.mark.slow
def test_packaged_minilm_int8_is_close_to_float32(tmp_path: Path) -> None:
    sentences = [
        "How do I read a file line by line in Python?",
        "The asyncio event loop schedules coroutines.",
        "Lists are mutable; tuples are not.",
        "Use a context manager to close files automatically.",
        "Qdrant stores the vectors of every chunk.",
    ]
    a = TextEmbedder(EmbedderConfig(model="minilm-l6")).encode_passages(sentences)
    b = TextEmbedder(EmbedderConfig(model="minilm-l6", backend="onnx", onnx_cache_dir=str(tmp_path)))
    assert _cos(a, b.encode_passages(sentences)).min() >= 0.99
    qa = TextEmbedder(EmbedderConfig(model="minilm-l6")).encode_queries(sentences[:2])
    assert _cos(qa, b.encode_queries(sentences[:2])).min() >= 0.99
