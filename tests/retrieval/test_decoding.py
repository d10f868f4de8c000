"""Decoding guards: runaway repeats end an answer, repetition controls shape the logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from ragops.retrieval.decoding import SequenceState, banned_ngram_tokens, penalize_repeats

if TYPE_CHECKING:
    from ragops.retrieval.generation import Generator

RUNAWAY = "Partitioning uses [6] Multi-Instance GPU technology\n\n[7] Multi-Instance GPU technology\n\n[8] Multi-Instance GPU technology\n\n[9]"


def _feed(tokenizer, text: str, *, stop_on_repeat: bool = True, stop: tuple[str, ...] = ()) -> tuple[SequenceState, str]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seq = SequenceState(tokenizer, stop, max_tokens=10_000, prompt_tokens=0, stop_on_repeat=stop_on_repeat)
    streamed = ""
    for tok in ids:
        streamed += seq.push(tok, False)
        if seq.done:
            break
    if not seq.done:
        streamed += seq.push(tokenizer.eos_token_id or 0, True)
    return seq, streamed


def test_a_repeated_numbered_line_ends_the_answer_and_is_cut(tiny_generator: Generator) -> None:
    seq, streamed = _feed(tiny_generator.tokenizer, RUNAWAY)
    assert seq.runaway and seq.finish_reason == "stop"
    # "[8] ..." repeats "[7] ..." (digits aside): cut there.
    assert seq.text == "Partitioning uses [6] Multi-Instance GPU technology\n\n[7] Multi-Instance GPU technology"
    assert streamed == seq.text  # the held-back repeat never reached the stream


def test_a_repeated_sentence_is_cut_but_distinct_sentences_stay(tiny_generator: Generator) -> None:
    text = "MIG splits one GPU into instances. MPS shares one GPU between processes. MIG splits one GPU into instances. More"
    seq, streamed = _feed(tiny_generator.tokenizer, text)
    assert seq.text == "MIG splits one GPU into instances. MPS shares one GPU between processes."
    assert streamed == seq.text


def test_without_the_guard_the_repeat_stays(tiny_generator: Generator) -> None:
    seq, streamed = _feed(tiny_generator.tokenizer, RUNAWAY, stop_on_repeat=False)
    assert not seq.runaway and seq.text == RUNAWAY and streamed == RUNAWAY


def test_short_repeats_are_not_runaways(tiny_generator: Generator) -> None:
    text = "Yes.\nYes.\n[1]\n[1]\nDone"
    seq, _ = _feed(tiny_generator.tokenizer, text)
    assert not seq.runaway and seq.text == text


def test_stop_strings_still_apply_with_the_guard(tiny_generator: Generator) -> None:
    seq, streamed = _feed(tiny_generator.tokenizer, "The answer is here. END more", stop=("END",))
    assert seq.text == "The answer is here. " and streamed == seq.text


def test_banned_ngrams_come_from_the_generated_history() -> None:
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 3], 3) == []
    assert banned_ngram_tokens([5, 5], 1) == [5, 5]
    assert banned_ngram_tokens([1, 2], 0) == []


def test_penalize_repeats_scales_seen_tokens_and_bans_ngrams() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    out = penalize_repeats(logits, [[0, 1], []], 2.0, 0)
    assert out[0].tolist() == [1.0, -4.0, 1.0, 0.5]
    assert out[1].tolist() == logits[1].tolist()  # no history, no change
    banned = penalize_repeats(logits, [[2, 3, 2], []], 1.0, 2)
    assert banned[0, 3] == -float("inf") and banned[0, 2] == 1.0
    assert penalize_repeats(logits, [[], []], 1.0, 0) is logits


def test_generator_applies_the_controls_and_validates_them(tiny_generator: Generator, monkeypatch) -> None:
    import ragops.retrieval.generation as generation
    from ragops.errors import InputError

    seen: list[list[int]] = []
    real = generation.penalize_repeats

    def spy(logits, histories, penalty, ngram):
        seen.append(list(histories[0]))
        return real(logits, histories, penalty, ngram)

    monkeypatch.setattr(generation, "penalize_repeats", spy)
    chat = [{"role": "user", "content": "Say something"}]
    res = tiny_generator.generate(chat, max_new_tokens=40, min_new_tokens=40, repetition_penalty=1.0, no_repeat_ngram_size=1)
    assert res.completion_tokens == 40 and len(seen) == 39
    # With 1-grams banned, no token is ever generated twice.
    assert len(set(seen[-1])) == len(seen[-1]) == 39
    seen.clear()
    tiny_generator.generate(chat, max_new_tokens=8, repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert not seen  # both controls off: the logits are left alone
    with pytest.raises(InputError, match="repetition_penalty"):
        tiny_generator.generate(chat, repetition_penalty=0.5)
    with pytest.raises(InputError, match="no_repeat_ngram_size"):
        tiny_generator.generate(chat, no_repeat_ngram_size=-1)
