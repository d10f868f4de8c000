"""Decoding state shared by every generation path: results, streams, stop and runaway guards.

:class:`~ragops.retrieval.generation.Generator` runs the model; this module holds what happens
to the tokens it picks:

* :class:`SequenceState` turns token ids into streamable text, ends a sequence on EOS, a stop
  string, the token budget, or a **runaway**: a line or sentence that repeats one already
  written (digits ignored, so "[6] Multi-Instance GPU" and "[7] Multi-Instance GPU" are the
  same line). A small model that starts listing the same item again never stops on its own;
  the repeat is cut and the answer ends with what was said once. Text that may be the start of
  such a repeat is held back from the stream (like a partial stop string), so the streamed
  deltas always concatenate to the final text.
* :func:`penalize_repeats` applies the repetition penalty (CTRL, Keskar et al. 2019) and the
  no-repeat n-gram ban to the logits. Both look at the *generated* tokens only, unlike
  transformers' processors, which for a decoder-only model also count the prompt: in RAG the
  prompt holds the passages, and penalising their words would push the model away from
  quoting its evidence.
"""

from __future__ import annotations

import time
from collections.abc import Generator as PyGenerator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length"]
T = TypeVar("T")

#: A line or sentence shorter than this (after trimming) is never treated as a runaway repeat
#: ("---", "[1]", "Yes.").
MIN_REPEAT_CHARS = 12

# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationTimings:
    """Wall-clock timings of one generation.

    Attributes:
        time_to_first_token_s: From the call to the first generated token (prompt encoding and
            prefill included).
        total_s: From the call to the end of this sequence's generation.
        tokens_per_s: Decode speed, the prefill excluded (like llama.cpp's "eval" rate):
            ``(completion_tokens - 1) / (total_s - time_to_first_token_s)``; with a single
            token, ``completion_tokens / total_s``.
    """

    time_to_first_token_s: float
    total_s: float
    tokens_per_s: float


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one generated sequence.

    Attributes:
        text: Generated text, stop sequence and special tokens removed.
        finish_reason: ``'stop'`` (end-of-sequence token or stop sequence) or ``'length'``
            (``max_new_tokens`` reached).
        prompt_tokens: Prompt tokens after truncation (for fused decoding: summed over prompts).
        completion_tokens: Generated tokens, the one that ended generation included.
        timings: See :class:`GenerationTimings`.
        source_logprobs: Fused decoding only: log-likelihood of the generated tokens under each
            fused prompt, in prompt order (the FiD reader attributes citations with it).
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: GenerationTimings
    source_logprobs: list[float] | None = None


class ResultStream(Iterator[str], Generic[T]):
    """Text deltas of a generation; its final result is available once exhausted.

    Iterate it for the deltas (they concatenate to the final text), then read :attr:`result`.
    :meth:`close` stops generation early (a client that went away); the result is then unset.
    """

    def __init__(self, gen: PyGenerator[str, None, T]) -> None:
        self._gen = gen
        self._result: T | None = None
        self._done = False

    def __iter__(self) -> ResultStream[T]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            return next(self._gen)
        except StopIteration as stop:
            self._done = True
            self._result = stop.value
            raise StopIteration from None

    @property
    def done(self) -> bool:
        """Whether the stream has ended (exhausted or closed)."""
        return self._done

    @property
    def result(self) -> T:
        """The final result; only after the stream was iterated to its end."""
        if not self._done or self._result is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._result

    def collect(self) -> T:
        """Consume the remaining deltas and return the result."""
        for _ in self:
            pass
        return self.result

    def close(self) -> None:
        """Stop generating; frees the KV cache held by the suspended loop."""
        self._gen.close()
        self._done = True



# ---------------------------------------------------------------------------------------
# Per-sequence decoding state
# ---------------------------------------------------------------------------------------


class _IncrementalDecoder:
    """Token ids → text deltas without re-decoding the whole sequence at every step.

    Decodes a short window (the previous delta's tokens plus the new ones) and keeps what the new
    tokens add, which also gets word-initial spaces right for SentencePiece tokenizers. A trailing
    U+FFFD means a UTF-8 character split across byte-level tokens: wait for the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :]


def _repeat_key(text: str) -> str:
    """A unit's identity for runaway detection: lower case, every digit the same.

    Length-preserving, so a prefix of the key is the key of a prefix.
    """
    return "".join("#" if c.isdigit() else c for c in text.lower())


#: Characters that end a unit (line or sentence) for runaway detection.
_UNIT_END = "\n"
_SENTENCE_END = ".!?"


class SequenceState:
    """One output sequence: its text, stop handling, runaway detection and what was streamed.

    Args:
        tokenizer: Detokenizes the generated ids.
        stop: Stop strings (trimmed from the text).
        max_tokens: Token budget.
        prompt_tokens: Prompt length (reported in the result).
        stop_on_repeat: End the sequence when a line/sentence repeats an earlier one.
    """

    def __init__(
        self, tokenizer: Any, stop: Sequence[str], max_tokens: int, prompt_tokens: int, *, stop_on_repeat: bool = True
    ) -> None:
        self.decoder = _IncrementalDecoder(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens
        self.stop_on_repeat = stop_on_repeat
        self.text = ""
        self.emitted = 0
        self.n_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.finished_at = 0.0
        #: True when the sequence ended on a repeated line/sentence (the repeat was cut).
        self.runaway = False
        self._units: set[str] = set()
        self._unit_start = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def generated_ids(self) -> list[int]:
        """Token ids generated so far."""
        return self.decoder.ids

    def push(self, token_id: int, is_eos: bool) -> str:
        """Add one generated token; return the text that is now safe to stream."""
        self.n_tokens += 1
        if is_eos:
            return self._finish("stop", self.decoder.flush())
        delta = self.decoder.push(token_id)
        if delta and self._append(delta):
            return self._release(final=True)
        if self.n_tokens >= self.max_tokens:
            return self._finish("length", self.decoder.flush())
        return self._release(final=False)

    def _append(self, delta: str) -> bool:
        """Append text; True when it ended the sequence (stop string or runaway repeat)."""
        # Only a stop string that overlaps the new text can be new.
        start = max(0, len(self.text) - self._max_stop + 1)
        scan = len(self.text)
        self.text += delta
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"
            self._check_units(scan, final=True)
            return True
        if self.stop_on_repeat and self._check_units(scan, final=False):
            self.finish_reason = "stop"
            self.runaway = True
            return True
        return False

    def _check_units(self, scan: int, *, final: bool) -> bool:
        """Close the units (lines, sentences) that end in ``text[scan:]``; True on a repeat."""
        if not self.stop_on_repeat:
            return False
        # One character back: a full stop that ended the previous delta ends a sentence only
        # once the whitespace after it has arrived.
        i = max(self._unit_start, scan - 1)
        while i < len(self.text):
            c = self.text[i]
            ends = c in _UNIT_END or (c in _SENTENCE_END and i + 1 < len(self.text) and self.text[i + 1].isspace())
            if ends:
                if self._close_unit(i + 1):
                    return True
            i += 1
        if final:
            self._close_unit(len(self.text))
        return False

    def _close_unit(self, end: int) -> bool:
        raw = self.text[self._unit_start : end]
        key = _repeat_key(raw.strip())
        if len(key) >= MIN_REPEAT_CHARS and key in self._units:
            # Cut the repeat (and the whitespace before it) from the text.
            self.text = self.text[: self._unit_start].rstrip()
            self.emitted = min(self.emitted, len(self.text))
            return True
        if len(key) >= MIN_REPEAT_CHARS:
            self._units.add(key)
        self._unit_start = end
        return False

    def _finish(self, reason: FinishReason, tail: str) -> str:
        if not (tail and self._append(tail)):
            self.finish_reason = reason
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        # Hold back a suffix that may be the start of a stop string or of a repeated unit, so
        # streamed text never contains what the final text trims.
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        held = 0
        for k in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                held = k
                break
        if self.stop_on_repeat:
            # Trailing whitespace waits for what follows it: if a repeat follows, it goes too.
            held = max(held, len(self.text) - len(self.text.rstrip()))
        if self.stop_on_repeat and self._units:
            # The open unit (with the whitespace before it) while it reads like an earlier one.
            partial = self.text[self._unit_start :]
            key = _repeat_key(partial.strip())
            if key and any(u.startswith(key) for u in self._units):
                held = max(held, len(self.text) - self._prefix_start())
        return held

    def _prefix_start(self) -> int:
        """Where the open unit's leading whitespace begins (it goes if the unit is cut)."""
        start = self._unit_start
        while start > self.emitted and start > 0 and self.text[start - 1].isspace():
            start -= 1
        return start


@dataclass
class DecodeOptions:
    """Validated per-call decoding options (see :meth:`Generator.generate`)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int
    min_new_tokens: int
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop_on_repeat: bool = True


@dataclass
class RunStats:
    """Timing and fused-decoding state of one decoding run."""

    t0: float
    first_token_at: float | None = None
    source_logprobs: list[float] | None = None


def banned_ngram_tokens(history: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an ``n``-gram already present in ``history``."""
    if n <= 0 or len(history) < n:
        return []
    prefix = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
    banned = []
    for i in range(len(history) - n + 1):
        if tuple(history[i : i + n - 1]) == prefix:
            banned.append(history[i + n - 1])
    return banned


def penalize_repeats(logits: torch.Tensor, histories: Sequence[Sequence[int]], penalty: float, ngram: int) -> torch.Tensor:
    """Logits with the repetition penalty and the n-gram ban applied per row (a new tensor).

    Args:
        logits: ``(rows, vocab)`` next-token logits.
        histories: Each row's generated token ids (the prompt is not included on purpose).
        penalty: > 1 divides positive (multiplies negative) logits of generated tokens.
        ngram: Ban tokens that would repeat an ``ngram``-gram of the row's output; 0 is off.
    """
    import math

    import torch

    if (penalty == 1.0 or not any(histories)) and ngram <= 0:
        return logits
    out = logits.clone()
    for row, hist in enumerate(histories):
        if not hist:
            continue
        if penalty != 1.0:
            ids = torch.tensor(sorted(set(hist)), dtype=torch.long, device=out.device)
            vals = out[row, ids]
            out[row, ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
        banned = banned_ngram_tokens(hist, ngram)
        if banned:
            out[row, banned] = -math.inf
    return out


def sequence_result(seq: SequenceState, stats: RunStats) -> GenerationResult:
    """The finished sequence as a :class:`GenerationResult` (timings from ``stats``)."""
    end = seq.finished_at or time.perf_counter()
    first = stats.first_token_at if stats.first_token_at is not None else end
    total = end - stats.t0
    decode = end - first
    if seq.n_tokens > 1 and decode > 0:
        tps = (seq.n_tokens - 1) / decode
    else:
        tps = seq.n_tokens / total if total > 0 else 0.0
    return GenerationResult(
        text=seq.text,
        finish_reason=seq.finish_reason or "length",
        prompt_tokens=seq.prompt_tokens,
        completion_tokens=seq.n_tokens,
        timings=GenerationTimings(time_to_first_token_s=first - stats.t0, total_s=total, tokens_per_s=tps),
        source_logprobs=list(stats.source_logprobs) if stats.source_logprobs is not None else None,
    )
