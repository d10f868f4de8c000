"""Training data: formats, citations, feedback pairing, malformed lines, Ray Data vs in-process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ragops.finetune.datasets import (
    build_preference_examples,
    build_sft_examples,
    cite_answer,
    pair_feedback,
    split_examples,
    supporting_passages,
)
from ragops.retrieval.prompts import Passage, as_passages, build_stuff_messages

from ragops.errors import InputError
from tests.finetune.conftest import preference_records, rag_records, write_jsonl


def test_rag_record_uses_the_stuff_prompt_and_cites_the_passage(tmp_path: Path, ft_settings: Callable[..., Any]) -> None:
    rec = rag_records(1)[0]
    built = build_sft_examples(write_jsonl(tmp_path / "d.jsonl", [rec]), ft_settings())
    (ex,) = built.examples
    assert ex["prompt"] == build_stuff_messages(rec["question"], as_passages(rec["contexts"]))
    assert ex["completion"] == [{"role": "assistant", "content": "The capital of France is Paris [2]."}]
    assert built.records == 1 and len(built.hash) == 64


def test_chat_record_gives_one_example_per_assistant_turn(tmp_path: Path, ft_settings: Callable[..., Any]) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "goodbye"},
    ]
    built = build_sft_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}]), ft_settings())
    assert [ex["prompt"] for ex in built.examples] == [msgs[:2], msgs[:4]]
    assert [ex["completion"][0]["content"] for ex in built.examples] == ["hello", "goodbye"]


def test_citations() -> None:
    ps = [Passage(1, "Berlin is in Germany."), Passage(2, "The capital of France is Paris.")]
    assert cite_answer("Paris", ps) == "Paris [2]"
    assert cite_answer("It is Paris.", ps) == "It is Paris [2]."  # its one content word is in passage 2
    assert supporting_passages("capital of France Paris", ps) == [2]
    assert cite_answer("Already cited [1].", ps) == "Already cited [1]."
    assert cite_answer("Nothing matches here.", ps) == "Nothing matches here."
    assert cite_answer("Paris.", ps, citations=[1]) == "Paris [1]."


def test_explicit_citations_and_no_cite(tmp_path: Path, ft_settings: Callable[..., Any]) -> None:
    rec = {**rag_records(1)[0], "citations": [1]}
    built = build_sft_examples(write_jsonl(tmp_path / "d.jsonl", [rec]), ft_settings())
    assert built.examples[0]["completion"][0]["content"].endswith("[1].")
    built = build_sft_examples(write_jsonl(tmp_path / "e.jsonl", [rag_records(1)[0]]), ft_settings("finetune.data.cite=false"))
    assert "[" not in built.examples[0]["completion"][0]["content"]


def test_malformed_lines_are_reported_with_file_and_line(tmp_path: Path, ft_settings: Callable[..., Any]) -> None:
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            rag_records(1)[0],
            "{not json",
            "",  # blank lines are skipped, not errors
            {"question": "q?", "answer": "a"},  # no contexts, no retrieve
            {"messages": [{"role": "robot", "content": "x"}]},
            [1, 2],
            {"foo": 1},
        ],
    )
    with pytest.raises(InputError) as exc:
        build_sft_examples(path, ft_settings())
    msg = str(exc.value)
    assert "5 malformed" in msg
    for line, needle in [(2, "not valid JSON"), (4, "contexts"), (5, "robot"), (6, "JSON object"), (7, "unrecognised record")]:
        assert f"{path}:{line}: " in msg and needle in msg


def test_empty_data_and_missing_files(tmp_path: Path, ft_settings: Callable[..., Any]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="empty"):
        build_sft_examples(empty, ft_settings())
    with pytest.raises(InputError, match="not found"):
        build_sft_examples(tmp_path / "nope.jsonl", ft_settings())
    with pytest.raises(InputError, match="no .jsonl"):
        build_sft_examples(tmp_path / "*.nothing", ft_settings())


def test_training_data_at_a_uri_builds_like_a_local_path(tmp_path: Path, ft_settings: Callable[..., Any]) -> None:
    """Cluster jobs name their data by URI: the same files through a pyarrow URI give the same dataset."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rag_records(3))
    local = build_sft_examples(folder, ft_settings())
    remote = build_sft_examples(f"file://{folder}", ft_settings())
    assert remote.examples == local.examples and remote.hash == local.hash
    assert remote.files == [f"file://{folder}/a.jsonl"]
    with pytest.raises(InputError, match="not found"):
        build_sft_examples(f"file://{folder}/missing.jsonl", ft_settings())


def test_data_kind_mismatch_is_explained(tmp_path: Path, ft_settings: Callable[..., Any]) -> None:
    pref = write_jsonl(tmp_path / "pref.jsonl", preference_records(2))
    with pytest.raises(InputError, match="ragops train reward"):
        build_sft_examples(pref, ft_settings())
    sft = write_jsonl(tmp_path / "sft.jsonl", rag_records(2))
    with pytest.raises(InputError, match="ragops train sft"):
        build_preference_examples(sft, ft_settings())


def test_preference_pairs_and_feedback(tmp_path: Path, ft_settings: Callable[..., Any]) -> None:
    passages = [{"n": 1, "text": "Paris is the capital of France."}]
    feedback = [
        {"request_id": "r1", "question": "Capital of France?", "passages": passages, "answer": "Berlin", "rating": "down",
         "preferred_answer": "Paris [1]"},
        {"request_id": "r2", "question": "capital of france", "passages": passages, "answer": "Paris [1].", "rating": "up"},
        {"request_id": "r3", "question": "Capital of France?", "passages": passages, "answer": "Lyon", "rating": "down"},
        {"request_id": "r4", "question": "Other?", "passages": [], "answer": "Yes", "rating": "up"},  # no pair
    ]  # fmt: skip
    fb_dir = tmp_path / "feedback"
    write_jsonl(fb_dir / "2026-11-25.jsonl", feedback[:2])
    write_jsonl(fb_dir / "2026-11-26.jsonl", feedback[2:])
    write_jsonl(fb_dir / "pairs.jsonl", [{"prompt": "Which GPU?", "chosen": "The H100 [1].", "rejected": "No idea."}])
    built = build_preference_examples(fb_dir, ft_settings())
    pairs = {(ex["chosen"][0]["content"], ex["rejected"][0]["content"]) for ex in built.examples}
    assert pairs == {
        ("Paris [1]", "Berlin"),  # preferred answer
        ("Paris [1].", "Berlin"),  # up vs down, same question
        ("Paris [1].", "Lyon"),
        ("The H100 [1].", "No idea."),
    }
    fb_example = next(ex for ex in built.examples if ex["rejected"][0]["content"] == "Lyon")
    assert fb_example["prompt"] == build_stuff_messages("capital of france", as_passages(passages))
    assert built.extra["feedback_records"] == 4


def test_feedback_without_pairs_and_bad_rating(tmp_path: Path, ft_settings: Callable[..., Any]) -> None:
    ups = [{"question": "q", "answer": "a", "rating": "up", "passages": []}]
    with pytest.raises(InputError, match="preferred_answer"):
        build_preference_examples(write_jsonl(tmp_path / "f.jsonl", ups), ft_settings())
    bad = [{"question": "q", "answer": "a", "rating": "meh"}]
    with pytest.raises(InputError, match=r"f2\.jsonl:1: 'rating'"):
        build_preference_examples(write_jsonl(tmp_path / "f2.jsonl", bad), ft_settings())
    assert pair_feedback([]) == []


def test_split_is_deterministic_and_holds_out_at_least_one() -> None:
    items = [{"i": i} for i in range(10)]
    a = split_examples(items, 0.2, seed=1)
    assert a == split_examples(items, 0.2, seed=1)
    assert len(a[1]) == 2 and len(a[0]) == 8
    assert len(split_examples(items[:3], 0.01, seed=0)[1]) == 1
    assert split_examples(items, 0.0, seed=0) == (items, [])
    with pytest.raises(InputError, match="eval_fraction"):
        split_examples(items[:1], 0.1, seed=0)


def test_ray_data_builds_the_same_examples(tmp_path: Path, ft_settings: Callable[..., Any], ray_local: None) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*rag_records(5), "oops"])
    with pytest.raises(InputError, match=r"d\.jsonl:6: not valid JSON"):
        build_sft_examples(path, ft_settings(), runner="ray")
    path = write_jsonl(tmp_path / "d.jsonl", rag_records(7))
    ray_built = build_sft_examples(path, ft_settings(), runner="ray")
    local_built = build_sft_examples(path, ft_settings(), runner="local")
    assert ray_built.examples == local_built.examples and len(ray_built.examples) == 7


def test_retrieve_true_fills_passages_from_the_index(
    tmp_path: Path, ft_settings: Callable[..., Any], tiny_embedder: Path, tiny_base: Path
) -> None:
    from tests.retrieval._helpers import BASE_OVERRIDES, ingest, write_corpus

    settings = ft_settings(f"embedder.model={tiny_embedder}", *BASE_OVERRIDES, "retrieval.mode=sparse")
    ingest(settings, write_corpus(tmp_path / "docs"))
    rec = {"question": "Where do the Parquet files land every night?", "answer": "In the kraken bucket.", "retrieve": True}
    built = build_sft_examples(write_jsonl(tmp_path / "r.jsonl", [rec]), settings, tokenizer_dir=str(tiny_base))
    (ex,) = built.examples
    user = ex["prompt"][1]["content"]
    assert "kraken bucket" in user and built.retrieved == 1
    answer = ex["completion"][0]["content"]
    n = int(answer.split("[")[1].split("]")[0])
    assert f"[{n}] " in user and "kraken" in user.split(f"[{n}] ")[1].split("\n\n[")[0]
