"""What every generation engine shares: message checks, options, prompt fitting, token helpers.

:class:`GeneratorBase` is the interface the readers, ``ragops ask``/``eval answers`` and the
serving deployment program against. Engines subclass it and supply the model-specific parts:

* :class:`~ragops.retrieval.generation.Generator` — transformers (training, the FiD reader,
  the reference implementation);
* :class:`~ragops.retrieval.llamacpp_engine.LlamaCppGenerator` — llama.cpp on GGUF weights;
* :class:`~ragops.retrieval.vllm_engine.VllmGenerator` — vLLM on GPU nodes.

Keeping option validation and context fitting here means every engine rejects the same bad
input with the same message and truncates the same prompt the same way, so engines can be
compared answer for answer.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ragops.config import GeneratorConfig
from ragops.errors import ConfigError, InputError
from ragops.retrieval.decoding import DecodeOptions, GenerationResult, ResultStream

log = logging.getLogger(__name__)

Message = dict[str, str]
Fusion = Literal["mixture", "product"]
ROLES = ("system", "user", "assistant")
FUSIONS = ("mixture", "product")
EngineName = Literal["transformers", "llamacpp", "vllm"]


class GeneratorBase(ABC):
    """A chat model behind one API, whatever engine runs it.

    Subclasses load the model in :meth:`_load` (called once by :meth:`warm_up`) and implement
    tokenization, chat rendering and the three decoding entry points.

    Attributes:
        engine: The engine's name (``transformers``, ``llamacpp``, ``vllm``).
        supports_fused: Whether :meth:`stream_fused` (the FiD reader) is available.
        concurrent: Whether several threads may call the generation methods at once (the
            engine then schedules them together itself).
    """

    engine: EngineName
    supports_fused: bool = False
    concurrent: bool = False

    def __init__(self, cfg: GeneratorConfig | None = None) -> None:
        self.cfg = cfg or GeneratorConfig()
        #: Why this engine was chosen (set by :func:`ragops.retrieval.engines.make_generator`).
        self.choice_reason = ""

    # -- loading -------------------------------------------------------------------------

    @property
    @abstractmethod
    def loaded(self) -> bool:
        """Whether :meth:`warm_up` has loaded the model."""

    @abstractmethod
    def warm_up(self) -> None:
        """Load the model once; later calls return at once."""

    @property
    @abstractmethod
    def max_context_tokens(self) -> int:
        """The context window in tokens (prompt plus generated tokens)."""

    def close(self) -> None:
        """Free what the engine holds beyond Python objects (threads, native contexts)."""

    def describe(self) -> dict[str, Any]:
        """What runs the answers, for ``/healthz`` and ``ragops models list``."""
        return {"engine": self.engine, "model": self.cfg.model, "adapter": self.cfg.adapter, "reason": self.choice_reason}

    # -- tokens and chat -----------------------------------------------------------------

    @abstractmethod
    def _tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids of ``text``; ``special`` adds the tokenizer's own BOS/EOS."""

    @abstractmethod
    def _detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""

    @abstractmethod
    def _render(self, msgs: list[Message]) -> str:
        """The chat as the model's prompt text, generation prompt appended."""

    @property
    @abstractmethod
    def _has_chat_template(self) -> bool:
        """Whether the model has a chat template (it then writes its own BOS)."""

    def _encode(self, msgs: list[Message]) -> list[int]:
        # A chat template writes its own BOS; a plain transcript needs the tokenizer's.
        return self._tokenize(self._render(msgs), special=not self._has_chat_template)

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` encodes to (no special tokens added)."""
        self.warm_up()
        return len(self._tokenize(text, special=False))

    def truncate_text(self, text: str, max_tokens: int) -> str:
        """Keep the first ``max_tokens`` tokens of ``text``."""
        self.warm_up()
        ids = self._tokenize(text, special=False)
        return text if len(ids) <= max_tokens else self._detokenize(ids[:max_tokens])

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, tokenize: bool = False) -> str | list[int]:
        """Render chat messages as the model's prompt, generation prompt appended.

        Models without a chat template get a plain ``role: content`` transcript.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            tokenize: Return token ids instead of text.

        Raises:
            InputError: malformed messages.
        """
        self.warm_up()
        msgs = validate_messages(messages)
        return self._encode(msgs) if tokenize else self._render(msgs)

    # -- generation ----------------------------------------------------------------------

    def generate(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        min_new_tokens: int = 0,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> GenerationResult:
        """Generate a reply to a chat.

        Args:
            messages: Chat messages (see :meth:`apply_chat_template`).
            max_new_tokens: Token budget of the reply; None takes ``cfg.max_new_tokens``.
            temperature: 0 is greedy and deterministic; above 0 samples. None takes the config's.
            top_p: Nucleus sampling mass (sampling only). None takes the config's.
            stop: Stop sequences: generation ends as soon as the text contains one, which is
                trimmed from the result. None takes ``cfg.stop``.
            seed: Seed of the sampler; None takes ``cfg.seed``. The same seed and inputs give
                the same sample.
            min_new_tokens: Suppress end-of-sequence before this many tokens (benchmarks use it
                to force equal lengths; stop sequences still apply).
            repetition_penalty: Penalty (>= 1) on tokens already generated; None takes the
                config's. Only generated tokens count, never the prompt (see
                :func:`~ragops.retrieval.decoding.penalize_repeats`).
            no_repeat_ngram_size: Never repeat an n-gram of the reply; 0 is off, None takes the
                config's.

        Returns:
            The generated text with finish reason, token counts and timings.

        Raises:
            InputError: malformed messages or options.
        """
        return self.stream(
            messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            stop=stop, seed=seed, min_new_tokens=min_new_tokens,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        ).collect()

    @abstractmethod
    def stream(self, messages: Sequence[Mapping[str, str]], **options: Any) -> ResultStream[GenerationResult]:
        """Like :meth:`generate`, but yields text deltas as they are decoded."""

    @abstractmethod
    def generate_batch(self, batch: Sequence[Sequence[Mapping[str, str]]], **options: Any) -> list[GenerationResult]:
        """Generate replies to several chats at once (one result per chat, in order)."""

    def stream_fused(self, batch: Sequence[Sequence[Mapping[str, str]]], **options: Any) -> ResultStream[GenerationResult]:
        """Fused (FiD) decoding; only the transformers engine has it."""
        raise ConfigError(
            f"the FiD reader needs generator.engine: transformers (this generator runs on {self.engine}); "
            "use generator.reader: stuff or extractive, or set generator.engine: transformers"
        )

    def generate_fused(self, batch: Sequence[Sequence[Mapping[str, str]]], *, fusion: Fusion = "mixture", **kwargs: Any) -> GenerationResult:
        """:meth:`stream_fused`, collected."""
        return self.stream_fused(batch, fusion=fusion, **kwargs).collect()

    # -- shared internals ----------------------------------------------------------------

    def _options(
        self,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        min_new_tokens: int = 0,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> DecodeOptions:
        """Per-call options over the config's defaults, validated."""
        cfg = self.cfg
        opts = DecodeOptions(
            max_new_tokens=cfg.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
            temperature=cfg.temperature if temperature is None else float(temperature),
            top_p=cfg.top_p if top_p is None else float(top_p),
            stop=list(cfg.stop) if stop is None else ([stop] if isinstance(stop, str) else list(stop)),
            seed=cfg.seed if seed is None else int(seed),
            min_new_tokens=int(min_new_tokens),
            repetition_penalty=cfg.repetition_penalty if repetition_penalty is None else float(repetition_penalty),
            no_repeat_ngram_size=cfg.no_repeat_ngram_size if no_repeat_ngram_size is None else int(no_repeat_ngram_size),
            stop_on_repeat=cfg.stop_on_repeat,
        )
        if opts.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1 (got {opts.max_new_tokens})")
        if opts.temperature < 0:
            raise InputError(f"temperature must be >= 0 (got {opts.temperature})")
        if not 0 < opts.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (got {opts.top_p})")
        if not 1.0 <= opts.repetition_penalty <= 2.0:
            raise InputError(f"repetition_penalty must be in [1, 2] (got {opts.repetition_penalty})")
        if opts.no_repeat_ngram_size < 0:
            raise InputError(f"no_repeat_ngram_size must be >= 0 (got {opts.no_repeat_ngram_size})")
        if not all(isinstance(s, str) for s in opts.stop):
            raise InputError("stop must be a string or a list of strings")
        return opts

    def _prepare(self, messages: Sequence[Mapping[str, str]], max_new: int) -> tuple[list[int], int]:
        """Encode a chat; fit prompt plus reply into the context window."""
        msgs = validate_messages(messages)
        ids = self._encode(msgs)
        limit = self.max_context_tokens
        if len(ids) + max_new <= limit:
            return ids, max_new
        # The reply's budget gives way first, down to half the window; then the prompt is cut.
        if max_new > limit // 2:
            capped = max(limit - len(ids), limit // 2)
            if capped < max_new:
                log.warning("max_new_tokens %d capped to %d to fit the %d-token context window", max_new, capped, limit)
                max_new = capped
        budget = limit - max_new
        if len(ids) > budget:
            ids = self._truncate_prompt(msgs, ids, budget)
        return ids, max_new

    def _truncate_prompt(self, msgs: list[Message], ids: list[int], budget: int) -> list[int]:
        """Cut the oldest non-system content from its left until the prompt fits ``budget``.

        Working on message contents (not raw tokens) keeps the chat template's structure and the
        system prompt intact; in a RAG prompt the passages come first and the question last, so
        passage text goes and the question stays.
        """
        original = len(ids)
        msgs = [dict(m) for m in msgs]
        for _ in range(8):  # re-tokenizing a cut can differ by a token or two: a few rounds
            over = len(ids) - budget
            if over <= 0:
                break
            i = next((k for k, m in enumerate(msgs) if m["role"] != "system" and m["content"]), None)
            if i is None:
                break
            content = self._tokenize(msgs[i]["content"], special=False)
            keep = max(len(content) - over - 1, 0)
            msgs[i]["content"] = self._detokenize(content[len(content) - keep :]) if keep else ""
            ids = self._encode(msgs)
        if len(ids) > budget:  # the system prompt alone is too long: plain left cut
            ids = ids[-budget:]
        log.warning(
            "prompt of %d tokens exceeds its budget of %d (context window %d minus the reply's tokens); "
            "truncated from the left of the context to %d tokens",
            original, budget, self.max_context_tokens, len(ids),
        )
        return ids


class HFChatMixin:
    """Tokenization and chat rendering through a transformers tokenizer (``self._tokenizer``).

    The transformers and vLLM engines share it, so both build byte-identical prompts.
    """

    _tokenizer: Any

    def _tokenize(self, text: str, *, special: bool) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=special)["input_ids"])

    def _detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))

    @property
    def _has_chat_template(self) -> bool:
        return bool(self._tokenizer.chat_template)

    def _render(self, msgs: list[Message]) -> str:
        if self._tokenizer.chat_template:
            return self._tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n\n" for m in msgs) + "assistant:"


def validate_messages(messages: Sequence[Mapping[str, str]]) -> list[Message]:
    """Check chat messages and return plain ``{"role", "content"}`` dicts.

    Raises:
        InputError: not a non-empty list of dicts with a known role and string content.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InputError(f"message {i}: expected a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InputError(f"message {i}: unknown role '{m['role']}'; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InputError(f"message {i}: content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out
