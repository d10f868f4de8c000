"""Prompts, citation parsing and the stuff / FiD readers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ragops.config import GeneratorConfig
from ragops.errors import InputError
from ragops.retrieval.generation import GenerationResult, GenerationTimings, Generator, ResultStream
from ragops.retrieval.prompts import (
    Passage,
    as_passages,
    build_fid_messages,
    build_stuff_messages,
    parse_citations,
)
from ragops.retrieval.readers import (
    FiDReader,
    ReaderResult,
    StuffReader,
    attribute,
    cite_from_posterior,
    get_reader,
)

QUESTION = "What is the capital of France?"
PASSAGES = [
    Passage(n=1, text="Paris is the capital of France.", title="France", doc_id="d1", chunk_id="c1", score=0.9),
    Passage(n=2, text="The Eiffel Tower was finished in 1889.", title="Eiffel Tower", score=0.7),
    Passage(n=3, text="Qdrant stores vectors for retrieval.", score=0.2),
]


# -- prompts and citations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "n", "expected"),
    [
        ("Paris [1].", 3, [1]),
        ("Paris [2] and Lyon [1][3].", 3, [2, 1, 3]),
        ("See [1, 3] and [2; 3].", 3, [1, 3, 2]),
        ("Many sources [2-4].", 5, [2, 3, 4]),
        ("En dash [3–1] reversed.", 3, [1, 2, 3]),
        ("Mixed [1, 3-4].", 4, [1, 3, 4]),
        ("Out of range [0] [7] [2-99999999].", 3, [2, 3]),
        ("Repeated [2] [2] [2].", 3, [2]),
        ("Not citations: [a], [], [1.5], array[i].", 3, []),
        ("Spaces [ 2 ,3 ].", 3, [2, 3]),
        ("[1 and 2]", 2, [1, 2]),
        ("No passages [1].", 0, []),
    ],
)
def test_parse_citations(answer: str, n: int, expected: list[int]) -> None:
    assert parse_citations(answer, n) == expected


def test_as_passages_numbers_by_position() -> None:
    ps = as_passages(["first", {"text": "second", "title": "T", "n": 9}, Passage(n=5, text="third")])
    assert [p.n for p in ps] == [1, 2, 3]
    assert ps[1].title == "T" and ps[2].text == "third"
    with pytest.raises(TypeError):
        as_passages([3])


def test_stuff_messages_number_passages_and_end_with_the_question() -> None:
    messages = build_stuff_messages(QUESTION, PASSAGES)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "[n]" in messages[0]["content"] or "[1]" in messages[0]["content"]
    user = messages[1]["content"]
    # Each passage's text is fenced as a quotation (passages are data, not instructions).
    assert user.index('[1] Title: France\n"""\nParis') < user.index("[2] Title: Eiffel") < user.index('[3] """\nQdrant')
    assert user.endswith(f"Question: {QUESTION}")
    assert "no passages" in build_stuff_messages(QUESTION, [])[1]["content"]


def test_fid_messages_put_the_passage_before_the_question() -> None:
    a = build_fid_messages(QUESTION, PASSAGES[0])[1]["content"]
    b = build_fid_messages("Another question?", PASSAGES[0])[1]["content"]
    assert "[1]" not in a and a.endswith(QUESTION)
    # The prefix through the passage does not depend on the question (cacheable).
    prefix = a[: a.index("Question:")]
    assert b.startswith(prefix) and PASSAGES[0].text in prefix


def test_attribution_and_citation_selection() -> None:
    post = attribute([-10.0, -2.0, -2.5, -30.0])
    assert sum(post) == pytest.approx(1.0)
    assert max(range(4), key=lambda i: post[i]) == 1
    assert cite_from_posterior(post, mass=0.9, max_citations=3) == [2, 3]
    assert cite_from_posterior(post, mass=0.5) == [2]
    assert cite_from_posterior([0.25] * 4, mass=0.9, max_citations=2) == [1, 2]


# -- stuff reader --------------------------------------------------------------------------


class ScriptedGenerator:
    """Stands in for Generator where the answer text must be controlled (citations)."""

    def __init__(self, deltas: list[str]) -> None:
        self.cfg = GeneratorConfig()
        self.deltas = deltas
        self.messages: list[Any] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def truncate_text(self, text: str, max_tokens: int) -> str:
        return " ".join(text.split()[:max_tokens])

    def stream(self, messages: list[dict[str, str]], **kwargs: Any) -> ResultStream[GenerationResult]:
        self.messages.append(messages)

        def run() -> Iterator[str]:
            yield from self.deltas
            return GenerationResult(
                text="".join(self.deltas),
                finish_reason="stop",
                prompt_tokens=10,
                completion_tokens=len(self.deltas),
                timings=GenerationTimings(0.1, 0.2, 10.0),
            )

        return ResultStream(run())  # type: ignore[arg-type]


def test_stuff_reader_parses_citations_from_the_answer() -> None:
    gen = ScriptedGenerator(["Paris", " is the capital", " [1]", " (see also [3-4] and [9])."])
    reader = StuffReader(gen)  # type: ignore[arg-type]
    res = reader.read(QUESTION, PASSAGES)
    assert isinstance(res, ReaderResult)
    assert res.answer == "Paris is the capital [1] (see also [3-4] and [9])."
    assert res.citations == [1, 3]
    assert [p.text for p in res.cited_passages] == [PASSAGES[0].text, PASSAGES[2].text]
    assert res.reader == "stuff" and res.finish_reason == "stop"
    assert res.timings.time_to_first_token_s >= 0.1
    assert gen.messages[0] == build_stuff_messages(QUESTION, PASSAGES)


def test_stuff_reader_fits_the_context_budget() -> None:
    gen = ScriptedGenerator(["ok [3]"])
    long = Passage(n=3, text=" ".join(["word"] * 200))
    reader = StuffReader(gen, context_tokens=70)  # type: ignore[arg-type]
    res = reader.read(QUESTION, [*PASSAGES[:2], long, PASSAGES[2]])
    # Passages 1-2 fit, the long third is shortened to the remaining budget, the fourth dropped.
    assert [p.n for p in res.passages] == [1, 2, 3]
    assert res.passages[2].text.startswith("word") and len(res.passages[2].text.split()) < 60
    assert res.citations == [3]


def test_stuff_reader_on_the_tiny_model(tiny_generator: Generator) -> None:
    reader = StuffReader(tiny_generator)
    res = reader.read(QUESTION, PASSAGES, max_new_tokens=8)
    direct = tiny_generator.generate(build_stuff_messages(QUESTION, PASSAGES), max_new_tokens=8)
    assert res.answer == direct.text
    assert res.citations == parse_citations(res.answer, 3)
    stream = reader.stream(QUESTION, PASSAGES, max_new_tokens=8)
    assert "".join(stream) == res.answer and stream.result.answer == res.answer


def test_readers_reject_an_empty_question(tiny_generator: Generator) -> None:
    for reader in (StuffReader(tiny_generator), FiDReader(tiny_generator)):
        with pytest.raises(InputError, match="empty"):
            reader.read("  ", PASSAGES)


# -- FiD reader ----------------------------------------------------------------------------


def _record_input_shapes(gen: Generator) -> tuple[list[tuple[int, ...]], Any]:
    shapes: list[tuple[int, ...]] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        shapes.append(tuple(kwargs["input_ids"].shape))

    return shapes, gen.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_fid_decodes_with_one_batched_row_per_passage(tiny_generator: Generator) -> None:
    shapes, handle = _record_input_shapes(tiny_generator)
    try:
        res = FiDReader(tiny_generator).read(QUESTION, PASSAGES, max_new_tokens=6)
    finally:
        handle.remove()
    assert res.completion_tokens == 6 and res.finish_reason == "length"
    # One prefill over the 3 padded (passage, question) prompts, then one 3-row step per token.
    assert shapes[0][0] == 3 and shapes[0][1] > 1
    assert shapes[1:] == [(3, 1)] * 5
    prompt_lens = [len(tiny_generator.apply_chat_template(build_fid_messages(QUESTION, p), tokenize=True)) for p in PASSAGES]
    assert shapes[0][1] == max(prompt_lens) and res.prompt_tokens == sum(prompt_lens)


@pytest.mark.parametrize("fusion", ["mixture", "product"])
def test_fid_is_deterministic_and_attributes_citations(tiny_generator: Generator, fusion: str) -> None:
    reader = FiDReader(tiny_generator, fusion=fusion)  # type: ignore[arg-type]
    a = reader.read(QUESTION, PASSAGES, max_new_tokens=8)
    b = reader.read(QUESTION, PASSAGES, max_new_tokens=8)
    assert a.answer == b.answer and a.citations == b.citations
    assert a.reader == "fid" and a.attribution is not None
    assert sum(a.attribution) == pytest.approx(1.0) and len(a.attribution) == 3
    assert 1 <= len(a.citations) <= 3 and set(a.citations) <= {1, 2, 3}
    # The top-attributed passage is always cited first.
    assert a.citations[0] == 1 + max(range(3), key=lambda i: a.attribution[i])
    stream = reader.stream(QUESTION, PASSAGES, max_new_tokens=8)
    assert "".join(stream) == a.answer and stream.result.citations == a.citations


@pytest.mark.parametrize("fusion", ["mixture", "product"])
def test_fid_with_one_passage_equals_greedy_generation(tiny_generator: Generator, fusion: str) -> None:
    for passage in PASSAGES:
        fid = FiDReader(tiny_generator, fusion=fusion).read(QUESTION, [passage], max_new_tokens=10)  # type: ignore[arg-type]
        direct = tiny_generator.generate(build_fid_messages(QUESTION, as_passages([passage])[0]), max_new_tokens=10)
        assert fid.answer == direct.text
        assert fid.citations == [1]


@pytest.mark.parametrize("fusion", ["mixture", "product"])
def test_fid_first_token_fuses_the_per_passage_distributions(tiny_generator: Generator, fusion: str) -> None:
    import torch

    rows = []
    with torch.no_grad():
        for p in PASSAGES:  # each prompt alone, unpadded: the reference for the padded batch
            ids = tiny_generator.apply_chat_template(build_fid_messages(QUESTION, p), tokenize=True)
            logits = tiny_generator.model(input_ids=torch.tensor([ids])).logits[0, -1]
            rows.append(logits.float().log_softmax(-1))
    logp = torch.stack(rows)
    fused = logp.logsumexp(0) - torch.log(torch.tensor(3.0)) if fusion == "mixture" else logp.mean(0)
    token = int(fused.argmax())
    res = FiDReader(tiny_generator, fusion=fusion).read(QUESTION, PASSAGES, max_new_tokens=1)  # type: ignore[arg-type]
    assert res.answer == tiny_generator.tokenizer.decode([token])
    expected_posterior = logp[:, token].softmax(0).tolist()
    assert res.attribution == pytest.approx(expected_posterior, rel=1e-4, abs=1e-6)


def test_fid_without_passages_still_answers(tiny_generator: Generator) -> None:
    res = FiDReader(tiny_generator).read(QUESTION, [], max_new_tokens=4)
    assert res.completion_tokens == 4 and res.citations == [] and res.passages == []


def test_fid_sampling_is_seeded(tiny_generator: Generator) -> None:
    reader = FiDReader(tiny_generator)
    kw = {"temperature": 1.0, "max_new_tokens": 8}
    assert reader.read(QUESTION, PASSAGES, seed=3, **kw).answer == reader.read(QUESTION, PASSAGES, seed=3, **kw).answer


# -- factory ---------------------------------------------------------------------------------


def test_get_reader(tiny_generator: Generator) -> None:
    assert isinstance(get_reader("stuff", tiny_generator), StuffReader)
    fid = get_reader("fid", tiny_generator, fusion="product")
    assert isinstance(fid, FiDReader) and fid.fusion == "product"
    with pytest.raises(InputError, match="allowed: stuff, fid"):
        get_reader("map-reduce", tiny_generator)
    with pytest.raises(InputError, match="fusion"):
        FiDReader(tiny_generator, fusion="max")  # type: ignore[arg-type]
