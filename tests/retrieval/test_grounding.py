"""The grounding check: per-sentence support, citation repair, fallback, flag, abstention."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragops.config import EmbedderConfig
from ragops.embeddings import TextEmbedder
from ragops.finetune.rewards import support as reward_support
from ragops.retrieval.extractive import ExtractiveReader, SentenceScorer
from ragops.retrieval.grounding import GroundedReader, abstain_answer, check_grounding, is_dont_know
from ragops.retrieval.prompts import Passage
from ragops.retrieval.readers import StuffReader
from ragops.retrieval.support import support
from tests.retrieval.test_readers import ScriptedGenerator

PASSAGES = [
    Passage(n=1, text="Paris is the capital of France and its largest city.", title="France", doc_id="d1", chunk_id="c1"),
    Passage(n=2, text="The Eiffel Tower was finished in 1889 for the World's Fair.", title="Eiffel Tower", doc_id="d2", chunk_id="c2"),
]
QUESTION = "When was the Eiffel Tower finished?"


@pytest.fixture(scope="module")
def extractive(tiny_embedder: Path) -> ExtractiveReader:
    return ExtractiveReader(SentenceScorer(TextEmbedder(EmbedderConfig(model=str(tiny_embedder)))), max_sentences=1)


def test_training_and_serving_share_one_support_measure() -> None:
    assert reward_support is support
    assert support("The Eiffel Tower was finished in 1889 [2].", PASSAGES[1].text) == 1.0


def test_a_supported_answer_keeps_its_text_and_is_grounded() -> None:
    answer = "The Eiffel Tower was finished in 1889 [2]."
    fixed, report = check_grounding(answer, PASSAGES, min_support=0.6)
    assert fixed == answer and report.grounded and report.support == 1.0
    assert [s.citations for s in report.sentences] == [[2]] and report.citations_fixed == 0


def test_a_wrong_citation_is_moved_a_missing_one_added_an_unsupported_one_removed() -> None:
    answer = "The Eiffel Tower was finished in 1889 [1]. Paris is the capital of France. Bananas grow on Mars [2]."
    fixed, report = check_grounding(answer, PASSAGES, min_support=0.6)
    assert fixed == "The Eiffel Tower was finished in 1889 [2]. Paris is the capital of France [1]. Bananas grow on Mars."
    assert [s.citations for s in report.sentences] == [[2], [1], []]
    assert report.citations_fixed == 4  # 1 -> 2 (two changes), +1, -2
    assert [round(s.support, 2) for s in report.sentences][2] == 0.0


def test_an_unsupported_answer_falls_back_to_the_extractive_answer(extractive: ExtractiveReader) -> None:
    gen = ScriptedGenerator(["The tower is made of cheese and was painted by Picasso [1]."])
    reader = GroundedReader(StuffReader(gen), extractive, mode="fallback", min_support=0.6)  # type: ignore[arg-type]
    stream = reader.stream(QUESTION, PASSAGES)
    deltas = list(stream)
    res = stream.result
    assert res.grounding.action == "fallback" and res.grounding.grounded
    assert "1889" in res.answer and "cheese" not in res.answer and res.citations == [2]
    assert "".join(deltas) == res.answer  # the withdrawn text was never streamed
    assert res.quotes and PASSAGES[1].text[res.quotes[0].start : res.quotes[0].end] == res.quotes[0].text


def test_flag_mode_returns_the_answer_marked_ungrounded(extractive: ExtractiveReader) -> None:
    text = "The tower is made of cheese and was painted by Picasso [1]."
    reader = GroundedReader(StuffReader(ScriptedGenerator([text])), extractive, mode="flag")  # type: ignore[arg-type]
    res = reader.read(QUESTION, PASSAGES)
    assert res.answer == text and res.grounding.grounded is False and res.grounding.action == "flagged"
    assert res.grounding.sentences[0].support < 0.6


def test_off_mode_runs_no_check(extractive: ExtractiveReader) -> None:
    text = "Cheese [1]."
    res = GroundedReader(StuffReader(ScriptedGenerator([text])), extractive, mode="off").read(QUESTION, PASSAGES)  # type: ignore[arg-type]
    assert res.answer == text and res.grounding is None


def test_a_dont_know_with_strong_evidence_is_replaced(extractive: ExtractiveReader) -> None:
    assert is_dont_know("I don't know.") and is_dont_know("The passages do not contain the answer.")
    assert not is_dont_know("It was finished in 1889.")
    reader = GroundedReader(StuffReader(ScriptedGenerator(["I don't know."])), extractive)  # type: ignore[arg-type]
    res = reader.read(QUESTION, PASSAGES)
    assert res.grounding.action == "fallback" and "1889" in res.answer


def test_weak_evidence_abstains_without_generating(extractive: ExtractiveReader) -> None:
    gen = ScriptedGenerator(["should not run"])
    reader = GroundedReader(StuffReader(gen), extractive, abstain_below=0.99)  # type: ignore[arg-type]
    res = reader.read("What is the capital of Peru?", PASSAGES)
    assert res.abstained and res.citations == [] and res.grounding.action == "abstained"
    assert res.answer == abstain_answer(PASSAGES)
    assert res.answer.startswith("The indexed documents do not cover this question.") and "France" in res.answer
    assert gen.messages == []  # nothing was generated
