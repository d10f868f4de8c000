"""Readers: a question and retrieved passages in, a cited answer out.

The generative readers live here; the extractive one (no generator) in
:mod:`ragops.retrieval.extractive`, and every reader is served wrapped in the abstention and
grounding checks of :mod:`ragops.retrieval.grounding` (see :func:`ragops.retrieval.rag.reader_for`).

Both readers share one interface — ``read(question, passages, **gen_kwargs) -> ReaderResult``
and ``stream(question, passages, **gen_kwargs)`` yielding text deltas — and take the generation
options of :meth:`Generator.generate <ragops.retrieval.generation.Generator.generate>`
(``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``min_new_tokens``).

**StuffReader** numbers the passages ``[1]..[n]`` in one prompt and asks for ``[n]``
citations, which are parsed from the answer. One prompt of ``n`` passages: the model can
combine evidence across passages, but the prompt (and the time to first token) grows with
``n``, and everything must fit one context window.

**FiDReader** — Fusion-in-Decoder for a decoder-only model. Original FiD (Izacard & Grave,
2021) encodes each (question, passage) pair independently with a T5 encoder and lets the decoder
cross-attend to all encodings at once. A decoder-only LM has no encoder and no cross-attention.
The options were:

(a) concatenate per-passage KV caches and decode over the concatenation. Independently encoded
    passages all start at position 0, so the concatenation has colliding positions (RoPE
    re-rotation hacks), and the model attends across blocks it was never trained to see
    side by side (parallel context windows / block attention need fine-tuning to work well);
(b) **chosen**: encode each passage with the question as its own prompt — one KV-cache row
    per passage, prefilled as one left-padded batch — and fuse the evidence while decoding: at
    every step the ``P`` rows' next-token distributions are combined, one token is chosen and
    appended to every row, so each decode step is one batched forward of ``P`` rows. Positions
    stay valid and every row is a prompt shaped like the model's training data.

With ``fusion='mixture'`` (default) the step distribution is ``1/P * sum_p p(y_t | passage_p, q,
y_<t)``: RAG-Token marginalisation (Lewis et al., 2020) with a uniform passage prior — a passage
that is confident about the next token dominates, which suits retrieval where a few of ``P``
passages hold the answer. ``fusion='product'`` averages log-probabilities (a product of
experts): a token must be plausible under every passage, so one off-topic passage can veto.
Both are greedy at temperature 0, and with one passage both equal plain greedy decoding.

Trade-offs against stuffing:

* + each prompt holds one passage, so prefill attention costs ``P * L^2`` rather than
  ``(P * L)^2``, more passages never push evidence out of the context window, and the prompt
  prefix (system prompt + passage, the question comes after it) does not depend on the question:
  its KV cache can later be computed once at ingest time and reused at query time;
* - a decode step runs ``P`` rows (on CPU the weights are read once per step, so much less than
  ``P`` times slower, but slower than one row), and no row sees two passages, so an answer that
  must combine facts from two passages is harder; under ``mixture`` many off-topic passages
  together can outweigh the one that knows.

Citations for FiD: the answer is generated without passage numbers in any prompt, so they are
attributed after decoding. Decoding already yields each passage's log-likelihood of the answer,
``l_p = sum_t log p(y_t | passage_p, q, y_<t)`` (no extra forward pass); ``softmax(l)`` is the
posterior over passages given the answer (RAG's document posterior, uniform prior). The reader
cites passages in decreasing posterior until ``cite_mass`` (0.9) of it is covered, at most
``max_citations``, and reports the posterior as ``ReaderResult.attribution``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
import math
import time
from collections.abc import Generator as PyGenerator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ragops.errors import InputError
from ragops.retrieval.generation import (
    Fusion,
    FUSIONS,
    GenerationResult,
    GenerationTimings,
    Generator,
    ResultStream,
)
from ragops.retrieval.injection import neutralize
from ragops.retrieval.prompts import (
    FID_SYSTEM_PROMPT,
    STUFF_SYSTEM_PROMPT,
    Passage,
    as_passages,
    build_fid_messages,
    build_stuff_messages,
    format_passage,
    parse_citations,
)

log = logging.getLogger(__name__)

#: A passage cut to fewer tokens than this is dropped rather than kept as a stub.
MIN_PASSAGE_TOKENS = 32


@dataclass(frozen=True)
class ReaderResult:
    """A reader's answer.

    Attributes:
        answer: Generated answer text (exactly the concatenated stream deltas).
        citations: Cited passage numbers (1-based, into ``passages``).
        passages: The passages the prompt(s) held, numbered as the citations use them (after
            fitting the token budget: fewer or shorter than given when they did not fit).
        reader: ``'stuff'`` or ``'fid'``.
        finish_reason: ``'stop'`` or ``'length'``.
        prompt_tokens: Prompt tokens (summed over the per-passage prompts for FiD).
        completion_tokens: Generated tokens.
        timings: From the ``read``/``stream`` call: time to first token, total, decode tokens/s.
        attribution: FiD only: posterior of each passage given the answer (sums to 1).
        quotes: Extractive answers: the exact spans quoted (passage number and offsets).
        evidence: Best candidate-sentence score for the question (0..1; abstention uses it).
        grounding: The grounding check's report (per-sentence support), when it ran.
        abstained: The answer says the documents do not cover the question.
    """

    answer: str
    citations: list[int]
    passages: list[Passage]
    reader: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: GenerationTimings
    attribution: list[float] | None = None
    quotes: list[Any] | None = None
    evidence: float | None = None
    grounding: Any = None
    abstained: bool = False

    @property
    def cited_passages(self) -> list[Passage]:
        """The cited passages, in citation order."""
        return [self.passages[n - 1] for n in self.citations]


class Reader(Protocol):
    """What serving and the CLI rely on."""

    name: str

    def read(self, question: str, passages: Iterable[Passage | str], **gen_kwargs: Any) -> ReaderResult: ...

    def stream(self, question: str, passages: Iterable[Passage | str], **gen_kwargs: Any) -> ResultStream[ReaderResult]: ...


class _BaseReader(ABC):
    """The shared read/stream flow; subclasses fit passages, generate and attribute citations."""

    name = ""

    def __init__(self, generator: Generator, *, context_tokens: int | None = None) -> None:
        self.generator = generator
        self.context_tokens = context_tokens

    def read(self, question: str, passages: Iterable[Passage | str], **gen_kwargs: Any) -> ReaderResult:
        """Answer ``question`` from ``passages``.

        Args:
            question: The user's question.
            passages: Retrieved passages, best first (strings are accepted and numbered).
            **gen_kwargs: Generation options (``max_new_tokens``, ``temperature``, ...).

        Raises:
            InputError: empty question or bad generation options.
        """
        return self.stream(question, passages, **gen_kwargs).collect()

    def stream(self, question: str, passages: Iterable[Passage | str], **gen_kwargs: Any) -> ResultStream[ReaderResult]:
        """Like :meth:`read`, yielding answer deltas; ``.result`` holds the :class:`ReaderResult`."""
        t0 = time.perf_counter()
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        # Passages are data: injected instructions and template tokens are neutralised first.
        fitted = self._fit([neutralize(p) for p in as_passages(passages)])
        called = time.perf_counter()
        inner = self._generate(question, fitted, gen_kwargs)
        offset = called - t0

        def run() -> PyGenerator[str, None, ReaderResult]:
            yield from inner
            res = inner.result
            citations, attribution = self._cite(res, fitted)
            t = res.timings
            return ReaderResult(
                answer=res.text,
                citations=citations,
                passages=fitted,
                reader=self.name,
                finish_reason=res.finish_reason,
                prompt_tokens=res.prompt_tokens,
                completion_tokens=res.completion_tokens,
                timings=GenerationTimings(
                    time_to_first_token_s=t.time_to_first_token_s + offset,
                    total_s=t.total_s + offset,
                    tokens_per_s=t.tokens_per_s,
                ),
                attribution=attribution,
            )

        return ResultStream(run())

    # Subclasses: the prompt(s) and the citations.
    @abstractmethod
    def _generate(self, question: str, passages: list[Passage], gen_kwargs: dict[str, Any]) -> ResultStream[GenerationResult]:
        """Start generation for ``question`` over the fitted ``passages`` (a result stream)."""

    @abstractmethod
    def _cite(self, res: GenerationResult, passages: list[Passage]) -> tuple[list[int], list[float] | None]:
        """Citation numbers for the finished answer, and per-passage attribution scores if any."""

    def _budget(self) -> int:
        return self.context_tokens if self.context_tokens is not None else self.generator.cfg.context_tokens

    @abstractmethod
    def _fit(self, passages: list[Passage]) -> list[Passage]:
        """The passages cut to this reader's token budget, best first."""

    def _shorten(self, passage: Passage, max_tokens: int) -> Passage | None:
        """The passage cut to ``max_tokens`` prompt tokens (header included); None if too short."""
        header = self.generator.count_tokens(format_passage(replace(passage, text="")))
        room = max_tokens - header
        if room < MIN_PASSAGE_TOKENS:
            return None
        return replace(passage, text=self.generator.truncate_text(passage.text, room))


class StuffReader(_BaseReader):
    """All passages numbered in one prompt; citations parsed from the answer.

    Args:
        generator: The generation backend.
        context_tokens: Token budget for the passages; None takes ``generator.cfg.context_tokens``.
            Passages are kept best first; the first that overflows is shortened, the rest dropped.
        system_prompt: Instructions (default asks for ``[n]`` citations).
    """

    name = "stuff"

    def __init__(
        self, generator: Generator, *, context_tokens: int | None = None, system_prompt: str = STUFF_SYSTEM_PROMPT
    ) -> None:
        super().__init__(generator, context_tokens=context_tokens)
        self.system_prompt = system_prompt

    def _fit(self, passages: list[Passage]) -> list[Passage]:
        budget, used, kept = self._budget(), 0, []
        for p in passages:
            n = self.generator.count_tokens(format_passage(p)) + 2  # + the blank line between passages
            if used + n > budget:
                short = self._shorten(p, budget - used)
                kept += [short] if short is not None else []
                log.info(
                    "stuff reader: %d of %d passages fit the %d-token context budget (the last one shortened: %s)",
                    len(kept), len(passages), budget, short is not None,
                )
                break
            kept.append(p)
            used += n
        return kept

    def _generate(self, question: str, passages: list[Passage], gen_kwargs: dict[str, Any]) -> ResultStream[GenerationResult]:
        messages = build_stuff_messages(question, passages, system_prompt=self.system_prompt)
        return self.generator.stream(messages, **gen_kwargs)

    def _cite(self, res: GenerationResult, passages: list[Passage]) -> tuple[list[int], list[float] | None]:
        return parse_citations(res.text, len(passages)), None


class FiDReader(_BaseReader):
    """Fusion-in-decoding: one prompt per passage, next-token distributions fused per step.

    See the module docstring for the method and its trade-offs.

    Args:
        generator: The generation backend.
        fusion: ``'mixture'`` (average of probabilities, default) or ``'product'`` (average of
            log-probabilities).
        cite_mass: Cite passages in decreasing posterior until this much posterior is covered.
        max_citations: At most this many citations.
        context_tokens: Token budget per passage (each prompt holds one); None takes
            ``generator.cfg.context_tokens``.
        system_prompt: Instructions for a single-passage prompt.
    """

    name = "fid"

    def __init__(
        self,
        generator: Generator,
        *,
        fusion: Fusion = "mixture",
        cite_mass: float = 0.9,
        max_citations: int = 3,
        context_tokens: int | None = None,
        system_prompt: str = FID_SYSTEM_PROMPT,
    ) -> None:
        super().__init__(generator, context_tokens=context_tokens)
        if fusion not in FUSIONS:
            raise InputError(f"unknown fusion '{fusion}'; allowed: {', '.join(FUSIONS)}")
        if not 0 < cite_mass <= 1:
            raise InputError(f"cite_mass must be in (0, 1] (got {cite_mass})")
        self.fusion: Fusion = fusion
        self.cite_mass = cite_mass
        self.max_citations = max_citations
        self.system_prompt = system_prompt

    def _fit(self, passages: list[Passage]) -> list[Passage]:
        budget, kept = self._budget(), []
        for p in passages:
            if self.generator.count_tokens(format_passage(p, numbered=False)) <= budget:
                kept.append(p)
            elif (short := self._shorten(p, budget)) is not None:
                kept.append(short)
        return as_passages(kept)

    def _generate(self, question: str, passages: list[Passage], gen_kwargs: dict[str, Any]) -> ResultStream[GenerationResult]:
        prompts = [build_fid_messages(question, p, system_prompt=self.system_prompt) for p in passages]
        if not prompts:  # nothing retrieved: one question-only prompt, the model says it doesn't know
            prompts = [build_fid_messages(question, None, system_prompt=self.system_prompt)]
        return self.generator.stream_fused(prompts, fusion=self.fusion, **gen_kwargs)

    def _cite(self, res: GenerationResult, passages: list[Passage]) -> tuple[list[int], list[float] | None]:
        if not passages or not res.source_logprobs or not res.text.strip():
            return [], None
        posterior = attribute(res.source_logprobs)
        return cite_from_posterior(posterior, self.cite_mass, self.max_citations), posterior


def attribute(source_logprobs: Sequence[float]) -> list[float]:
    """Posterior over passages given the answer: ``softmax`` of their answer log-likelihoods."""
    top = max(source_logprobs)
    weights = [math.exp(lp - top) for lp in source_logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def cite_from_posterior(posterior: Sequence[float], mass: float = 0.9, max_citations: int = 3) -> list[int]:
    """Passage numbers (1-based) in decreasing posterior until ``mass`` is covered."""
    order = sorted(range(len(posterior)), key=lambda i: -posterior[i])
    cited, covered = [], 0.0
    for i in order[:max_citations]:
        cited.append(i + 1)
        covered += posterior[i]
        if covered >= mass:
            break
    return cited


READERS: dict[str, type[_BaseReader]] = {"stuff": StuffReader, "fid": FiDReader}
#: Every reader name: the generative ones above and the extractive reader (no generator; it is
#: built by :func:`ragops.retrieval.rag.reader_for`, which has the embedder it scores with).
READER_NAMES = (*READERS, "extractive")


def check_reader_name(name: str) -> None:
    """Raise :class:`InputError` naming the allowed readers unless ``name`` is one."""
    if name not in READER_NAMES:
        raise InputError(f"unknown reader '{name}'; allowed: {', '.join(READER_NAMES)}")


def get_reader(name: str, generator: Generator, **options: Any) -> Reader:
    """Build a reader by name.

    Args:
        name: ``'stuff'`` or ``'fid'``.
        generator: The generation backend.
        **options: Reader options (e.g. ``fusion='product'`` for FiD).

    Raises:
        InputError: unknown reader name (the message lists the allowed ones).
    """
    check_reader_name(name)
    if name not in READERS:
        raise InputError(f"the '{name}' reader has no generator; build it with ragops.retrieval.rag.reader_for")
    return READERS[name](generator, **options)
