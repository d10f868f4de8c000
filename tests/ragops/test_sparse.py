"""BM25Encoder: analysis, stable indices, BM25 document values, query vectors."""

from __future__ import annotations

import doctest
import json
import os
import pickle
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragops import sparse
from ragops.config import SparseConfig
from ragops.errors import ConfigError
from ragops.sparse import INDEX_MASK, BM25Encoder, term_index
from ragops.vectorstore.base import SparseVector


@pytest.fixture(scope="module")
def enc() -> BM25Encoder:
    return BM25Encoder(SparseConfig())


def _value(vec: SparseVector, stem: str) -> float:
    return vec.values[vec.indices.index(term_index(stem))]


# --- analysis -------------------------------------------------------------------------


def test_tokenize_lowercases_stems_and_drops_stop_words(enc: BM25Encoder) -> None:
    assert enc.tokenize("The runners were Running and it runs") == ["runner", "run", "run"]


def test_technical_tokens_keep_letters_and_digits_together(enc: BM25Encoder) -> None:
    # Non-alphanumerics (".", "-", "_", "'") split; runs of letters+digits stay whole.
    assert enc.tokenize("A100 h100 k8s 1g.10gb gpt-4o snake_case") == [
        "a100", "h100", "k8s", "1g", "10gb", "gpt", "4o", "snake", "case",
    ]


def test_single_letters_dropped_single_digits_and_cjk_kept(enc: BM25Encoder) -> None:
    # "GPU's" leaves an "s", "x" is a lone letter; "3" and "東" carry meaning.
    assert enc.tokenize("GPU's x 3 東") == ["gpu", "3", "東"]


def test_nfkc_folds_full_width_characters(enc: BM25Encoder) -> None:
    assert enc.tokenize("Ａ１００") == enc.tokenize("a100") == ["a100"]


def test_stop_words_only_gives_empty_vectors(enc: BM25Encoder) -> None:
    empty = SparseVector(indices=[], values=[])
    assert enc.encode_documents(["", "the and of", "   "]) == [empty, empty, empty]
    assert enc.encode_query("what is the") == empty


def test_stemming_shares_an_index(enc: BM25Encoder) -> None:
    assert enc.encode_query("running").indices == enc.encode_query("runs").indices == [term_index("run")]


def test_unknown_language_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="klingon"):
        BM25Encoder(SparseConfig(language="klingon"))


def test_other_language_stems_without_english_stop_words() -> None:
    german = BM25Encoder(SparseConfig(language="german"))
    assert german.tokenize("die Häuser") == ["die", "haus"]


# --- indices ------------------------------------------------------------------------------


def test_indices_are_stable_across_processes() -> None:
    # Python's hash() is salted per process; indices must not be. Two fresh interpreters with
    # different hash seeds must agree with this one.
    texts = ["Kubernetes schedules GPU pods on A100 nodes", "BM25 ranks documents"]
    code = (
        "import json, sys; from ragops.sparse import BM25Encoder; "
        "e = BM25Encoder(); print(json.dumps([v.indices for v in e.encode_documents(json.loads(sys.argv[1]))]))"
    )
    here = [v.indices for v in BM25Encoder().encode_documents(texts)]
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(texts)], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == here


def test_term_index_is_pinned() -> None:
    # Pinned values: if these move, every stored bm25 vector is stale (bump ANALYZER_VERSION).
    assert term_index("run") == term_index("run") < 2**31
    assert term_index("39506") == term_index("40625") == 131801575


def test_hash_collisions_merge_counts(enc: BM25Encoder) -> None:
    # "39506" and "40625" collide (found by search, pinned above): the document counts them as
    # one term with tf=2, and the query has the index once.
    merged = enc.encode_documents(["39506 40625"])[0]
    twice = enc.encode_documents(["39506 39506"])[0]
    assert merged == twice
    assert merged.indices == [131801575]
    assert enc.encode_query("39506 40625") == SparseVector(indices=[131801575], values=[1.0])


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_vectors_are_well_formed(text: str) -> None:
    enc = BM25Encoder()
    for vec in (enc.encode_documents([text])[0], enc.encode_query(text)):
        assert vec.indices == sorted(set(vec.indices))
        assert len(vec.values) == len(vec.indices)
        assert all(0 <= i <= INDEX_MASK for i in vec.indices)
        assert all(v > 0 for v in vec.values)


# --- values -------------------------------------------------------------------------------


def test_document_value_hand_computed() -> None:
    enc = BM25Encoder(SparseConfig(k1=1.2, b=0.75, avg_doc_tokens=4))
    # Kept tokens: gpu, gpu, memori, bandwidth -> len = 4 = avg, so the length factor is
    # 1 - b + b*4/4 = 1 and norm = k1 = 1.2.
    # gpu: tf=2 -> 2*2.2/(2+1.2) = 4.4/3.2 = 1.375; memori: 1*2.2/(1+1.2) = 1.0
    vec = enc.encode_documents(["The GPU, the GPU memory bandwidth"])[0]
    assert _value(vec, "gpu") == pytest.approx(1.375)
    assert _value(vec, "memori") == pytest.approx(1.0)
    assert _value(vec, "bandwidth") == pytest.approx(1.0)
    # len = 2 against avg 4: factor 1 - 0.75 + 0.75*2/4 = 0.625, norm = 0.75;
    # tf=1 -> 2.2/1.75 = 1.2571428...
    assert _value(enc.encode_documents(["gpu memory"])[0], "gpu") == pytest.approx(2.2 / 1.75)


def test_query_is_one_per_distinct_term(enc: BM25Encoder) -> None:
    q = enc.encode_query("GPU gpu memory of the GPU")
    assert q.indices == sorted([term_index("gpu"), term_index("memori")])
    assert q.values == [1.0, 1.0]
    assert enc.encode_queries(["gpu", ""]) == [enc.encode_query("gpu"), SparseVector([], [])]


def test_tf_saturates_monotonically(enc: BM25Encoder) -> None:
    # Same length (padding with another word) so only tf changes: the value grows with tf,
    # by less each time, and stays below k1 + 1.
    values = [_value(enc.encode_documents([" ".join(["gpu"] * tf + ["pad"] * (20 - tf))])[0], "gpu") for tf in range(1, 20)]
    gains = [b - a for a, b in zip(values, values[1:])]
    assert all(g > 0 for g in gains)
    assert all(g2 < g1 for g1, g2 in zip(gains, gains[1:]))
    assert values[-1] < enc.cfg.k1 + 1


def test_longer_documents_get_lower_term_values(enc: BM25Encoder) -> None:
    values = [_value(enc.encode_documents(["gpu " + "pad " * n])[0], "gpu") for n in (0, 10, 100, 1000)]
    assert values == sorted(values, reverse=True) and len(set(values)) == 4


def test_b_zero_ignores_length() -> None:
    enc = BM25Encoder(SparseConfig(b=0.0))
    short, long = enc.encode_documents(["gpu", "gpu " + "pad " * 500])
    assert _value(short, "gpu") == pytest.approx(_value(long, "gpu")) == pytest.approx(1.0)


def test_encoder_pickles_for_ray(enc: BM25Encoder) -> None:
    clone = pickle.loads(pickle.dumps(enc))
    assert clone.encode_query("gpu nodes") == enc.encode_query("gpu nodes")
    assert clone.identity == enc.identity == "bm25-v1-english-k1=1.2-b=0.75-avg=120"


def test_docstring_examples() -> None:
    result = doctest.testmod(sparse)
    assert result.attempted > 0 and result.failed == 0
