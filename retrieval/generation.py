"""Generation backend: a transformers causal LM behind a small, typed API.

:class:`Generator` resolves ``GeneratorConfig.model`` through the model registry (registry name,
local Hugging Face folder, or GGUF file that transformers dequantizes), optionally merges a LoRA
adapter, and decodes with a hand-written loop over the model's KV cache rather than
``model.generate``:

* one loop serves :meth:`~Generator.generate`, :meth:`~Generator.stream`,
  :meth:`~Generator.generate_batch` and fused (FiD) decoding, so streamed deltas are exactly the
  generated text and the fused step of the FiD reader is a few lines, not a logits-processor hack;
* streaming needs no thread and no queue (``TextIteratorStreamer`` runs ``generate`` in a thread
  and hands every token across a queue);
* each step is one forward over the new token, one argmax (or sample) and one windowed
  detokenization — no per-token work that grows with the sequence — so throughput matches
  ``model.generate`` (see ``benchmarks/RESULTS-generation.md``).

The loop needs a decoder-only model that takes ``attention_mask`` and ``position_ids`` with a
KV cache, which covers the usual families (Llama, Mistral, Qwen, Gemma, Phi, SmolLM, ...).
Batches are left-padded; positions come from the attention mask as in ``model.generate``.

Torch and transformers are imported on first use, so importing this module stays cheap (the CLI
imports it to build its commands).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections.abc import Generator as PyGenerator
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from ragops.config import GeneratorConfig
from ragops.errors import ConfigError, InputError, ModelNotFoundError
from ragops.model_registry import ModelSpec, resolve_model
from ragops.retrieval.model_loading import (  # noqa: F401 - resolve_adapter/resolve_device are public here too
    DEFAULT_CONTEXT_TOKENS,
    context_window,
    locate_generator,
    merge_adapter,
    resolve_adapter,
    resolve_device,
)
from ragops.retrieval.decoding import (  # noqa: F401 - results are public here too
    DecodeOptions,
    FinishReason,
    GenerationResult,
    GenerationTimings,
    ResultStream,
    RunStats,
    SequenceState,
    penalize_repeats,
    sequence_result,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Message = dict[str, str]
Fusion = Literal["mixture", "product"]
ROLES = ("system", "user", "assistant")
FUSIONS = ("mixture", "product")


# ---------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------


class Generator:
    """A transformers causal LM: chat prompts in, text (or text deltas) out.

    Settings are read in the constructor; the model loads in :meth:`warm_up`, which every other
    method calls on first use. Not meant to be shared across threads while generating (one
    Ray Serve replica owns one generator and batches requests with :meth:`generate_batch`).

    Args:
        cfg: Generator settings (model, adapter, device, dtype, sampling defaults).

    Example:
        >>> gen = Generator(GeneratorConfig(max_new_tokens=32))
        >>> gen.generate([{"role": "user", "content": "Say hi"}]).text  # doctest: +SKIP
    """

    def __init__(self, cfg: GeneratorConfig | None = None) -> None:
        self.cfg = cfg or GeneratorConfig()
        self.spec: ModelSpec | None = None
        self.device: str | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id = 0
        self._cache_arg = "cache"
        self._logits_to_keep = False
        self._max_context = DEFAULT_CONTEXT_TOKENS

    # -- loading -------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether :meth:`warm_up` has loaded the model."""
        return self._model is not None

    def warm_up(self) -> None:
        """Resolve and load tokenizer, model and adapter (once; later calls return at once).

        Raises:
            ModelNotFoundError: unknown model, missing package or path, hub id not cached, or
                weights/adapter that do not load.
            ConfigError: a CUDA device was asked for and none is available.
        """
        if self._model is not None:
            return
        with self._lock:
            if self._model is None:
                self._load()

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = resolve_model(self.cfg.model, kind="generator")
        path = locate_generator(spec)
        device = resolve_device(self.cfg.device)
        if spec.gguf_file is None and path.is_dir() and not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"generator '{self.cfg.model}': {path} holds neither config.json nor a .gguf file"
            )
        extra = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        started = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), **extra)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, self.cfg.dtype), **extra)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelNotFoundError(f"could not load generator '{self.cfg.model}' from {path}: {exc}") from exc
        if self.cfg.adapter:
            model = merge_adapter(model, resolve_adapter(self.cfg.adapter))
        model.to(device).eval()

        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache; accept both.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        eos: set[int] = set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, tokenizer.eos_token_id):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        self._eos_ids = frozenset(eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = int(pad) if pad is not None else 0
        self._max_context = context_window(model.config, tokenizer)
        self.spec, self.device, self._tokenizer, self._model = spec, device, tokenizer, model
        log.info(
            "generator %s loaded on %s (%s) in %.1f s%s",
            self.cfg.model, device, self.cfg.dtype, time.perf_counter() - started,
            f" with adapter {self.cfg.adapter}" if self.cfg.adapter else "",
        )

    @property
    def model(self) -> Any:
        """The loaded transformers model (loads it on first access)."""
        self.warm_up()
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The loaded tokenizer (loads the generator on first access)."""
        self.warm_up()
        return self._tokenizer

    @property
    def max_context_tokens(self) -> int:
        """The model's context window in tokens (prompt plus generated tokens)."""
        self.warm_up()
        return self._max_context

    # -- text helpers --------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` encodes to (no special tokens added)."""
        self.warm_up()
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate_text(self, text: str, max_tokens: int) -> str:
        """Keep the first ``max_tokens`` tokens of ``text``."""
        self.warm_up()
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self._tokenizer.decode(ids[:max_tokens])

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
        msgs = _validate_messages(messages)
        return self._encode(msgs) if tokenize else self._render(msgs)

    def _render(self, msgs: list[Message]) -> str:
        if self._tokenizer.chat_template:
            return self._tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n\n" for m in msgs) + "assistant:"

    def _encode(self, msgs: list[Message]) -> list[int]:
        # A chat template writes its own BOS; a plain transcript needs the tokenizer's.
        special = not self._tokenizer.chat_template
        return list(self._tokenizer(self._render(msgs), add_special_tokens=special)["input_ids"])

    # -- public generation API -----------------------------------------------------------

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
            seed: Seed of the sampler's own ``torch.Generator``; None takes ``cfg.seed``. The
                same seed and inputs give the same sample.
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

    def stream(
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
    ) -> ResultStream[GenerationResult]:
        """Like :meth:`generate`, but yields text deltas as they are decoded.

        The prompt is checked and encoded at once (errors raise here); decoding runs as the
        stream is iterated. The deltas concatenate to ``stream.result.text``, and a held-back
        partial stop sequence is never streamed.
        """
        t0 = time.perf_counter()
        self.warm_up()
        opts = self._options(max_new_tokens, temperature, top_p, stop, seed, min_new_tokens,
                             repetition_penalty, no_repeat_ngram_size)  # fmt: skip
        ids, max_new = self._prepare(messages, opts.max_new_tokens)
        seq = SequenceState(self._tokenizer, opts.stop, max_new, len(ids), stop_on_repeat=opts.stop_on_repeat)

        def run() -> PyGenerator[str, None, GenerationResult]:
            stats = RunStats(t0)
            for deltas in self._decode([ids], [seq], opts, stats, fusion=None):
                if deltas[0]:
                    yield deltas[0]
            return sequence_result(seq, stats)

        return ResultStream(run())

    def generate_batch(
        self,
        batch: Sequence[Sequence[Mapping[str, str]]],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        min_new_tokens: int = 0,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> list[GenerationResult]:
        """Generate replies to several chats in one left-padded batch.

        Each sequence stops on its own (finished rows are fed padding until all end). At
        temperature 0 every reply equals :meth:`generate` on that chat alone. With sampling the
        batch shares one seeded sampler, so a row's sample depends on the batch it ran in.

        Args:
            batch: One message list per reply.
            max_new_tokens, temperature, top_p, stop, seed, min_new_tokens: As in :meth:`generate`.

        Returns:
            One result per chat, in order; ``total_s`` is when that row finished.
        """
        t0 = time.perf_counter()
        self.warm_up()
        if not batch:
            return []
        opts = self._options(max_new_tokens, temperature, top_p, stop, seed, min_new_tokens,
                             repetition_penalty, no_repeat_ngram_size)  # fmt: skip
        prepared = [self._prepare(messages, opts.max_new_tokens) for messages in batch]
        seqs = [SequenceState(self._tokenizer, opts.stop, n, len(ids), stop_on_repeat=opts.stop_on_repeat) for ids, n in prepared]
        stats = RunStats(t0)
        for _ in self._decode([ids for ids, _ in prepared], seqs, opts, stats, fusion=None):
            pass
        return [sequence_result(seq, stats) for seq in seqs]

    def stream_fused(
        self,
        batch: Sequence[Sequence[Mapping[str, str]]],
        *,
        fusion: Fusion = "mixture",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        min_new_tokens: int = 0,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> ResultStream[GenerationResult]:
        """Decode ONE reply from several prompts by fusing their next-token distributions.

        Each prompt is prefilled independently (a left-padded batch, one KV cache row each);
        at every step the rows' log-probabilities are fused, one token is chosen and appended to
        every row. This is the decoding half of the FiD reader.

        Args:
            batch: The prompts (one message list each, e.g. one per passage).
            fusion: ``'mixture'`` averages probabilities (``log mean_p p_p``; a confident row
                wins, RAG-Token style); ``'product'`` averages log-probabilities (every row
                must agree).
            max_new_tokens, temperature, top_p, stop, seed, min_new_tokens: As in :meth:`generate`.

        Returns:
            A stream whose result has ``source_logprobs``: the reply's log-likelihood under each
            prompt.

        Raises:
            InputError: empty batch, unknown fusion, malformed messages or options.
        """
        t0 = time.perf_counter()
        self.warm_up()
        if not batch:
            raise InputError("fused decoding needs at least one prompt")
        if fusion not in FUSIONS:
            raise InputError(f"unknown fusion '{fusion}'; allowed: {', '.join(FUSIONS)}")
        opts = self._options(max_new_tokens, temperature, top_p, stop, seed, min_new_tokens,
                             repetition_penalty, no_repeat_ngram_size)  # fmt: skip
        prepared = [self._prepare(messages, opts.max_new_tokens) for messages in batch]
        max_new = min(n for _, n in prepared)
        seq = SequenceState(
            self._tokenizer, opts.stop, max_new, sum(len(ids) for ids, _ in prepared), stop_on_repeat=opts.stop_on_repeat
        )

        def run() -> PyGenerator[str, None, GenerationResult]:
            stats = RunStats(t0)
            for deltas in self._decode([ids for ids, _ in prepared], [seq], opts, stats, fusion=fusion):
                if deltas[0]:
                    yield deltas[0]
            return sequence_result(seq, stats)

        return ResultStream(run())

    def generate_fused(
        self, batch: Sequence[Sequence[Mapping[str, str]]], *, fusion: Fusion = "mixture", **kwargs: Any
    ) -> GenerationResult:
        """:meth:`stream_fused`, collected."""
        return self.stream_fused(batch, fusion=fusion, **kwargs).collect()

    # -- internals -----------------------------------------------------------------------

    def _options(
        self,
        max_new_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        stop: Sequence[str] | str | None,
        seed: int | None,
        min_new_tokens: int,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> DecodeOptions:
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
        msgs = _validate_messages(messages)
        ids = self._encode(msgs)
        limit = self._max_context
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
            content = self._tokenizer(msgs[i]["content"], add_special_tokens=False)["input_ids"]
            keep = max(len(content) - over - 1, 0)
            msgs[i]["content"] = self._tokenizer.decode(content[len(content) - keep :]) if keep else ""
            ids = self._encode(msgs)
        if len(ids) > budget:  # the system prompt alone is too long: plain left cut
            ids = ids[-budget:]
        log.warning(
            "prompt of %d tokens exceeds its budget of %d (context window %d minus the reply's tokens); "
            "truncated from the left of the context to %d tokens",
            original, budget, self._max_context, len(ids),
        )
        return ids

    def _decode(
        self,
        prompts: list[list[int]],
        seqs: list[SequenceState],
        opts: DecodeOptions,
        stats: RunStats,
        fusion: Fusion | None,
    ) -> Iterator[list[str]]:
        """The decoding loop: yields, per step, each sequence's new streamable text.

        Without fusion there is one sequence per prompt row. With fusion there is one sequence
        and every row is fed the same chosen token, so each keeps its own valid cache/positions.
        """
        import torch

        rows = len(prompts)
        ids, mask = self._pad_left(prompts)
        # Left padding: positions count real tokens only, as model.generate does.
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        sampler = None
        if opts.temperature > 0:
            sampler = torch.Generator(device=self.device)
            sampler.manual_seed(opts.seed)
        logits, cache = self._forward(ids, mask, pos, None)
        source_lp = [0.0] * rows if fusion else None
        step = 0
        while True:
            block_eos = step < opts.min_new_tokens
            if step and (opts.repetition_penalty != 1.0 or opts.no_repeat_ngram_size):
                # Fused rows share one output sequence, so one history serves every row.
                hist = [seqs[0].generated_ids] * rows if fusion else [s.generated_ids for s in seqs]
                logits = penalize_repeats(logits, hist, opts.repetition_penalty, opts.no_repeat_ngram_size)
            if fusion:
                token, row_lp = self._pick_fused(logits, fusion, opts, sampler, block_eos)
                source_lp = [a + b for a, b in zip(source_lp, row_lp)]  # type: ignore[arg-type]
                stats.source_logprobs = source_lp
                tokens = [token]
            else:
                tokens = self._pick(logits, opts, sampler, block_eos).tolist()
            now = time.perf_counter()
            if stats.first_token_at is None:
                stats.first_token_at = now
            deltas = []
            for seq, tok in zip(seqs, tokens):
                if seq.done:
                    deltas.append("")
                    continue
                deltas.append(seq.push(tok, tok in self._eos_ids))
                if seq.done:
                    seq.finished_at = now
            yield deltas
            if all(seq.done for seq in seqs):
                return
            step += 1
            if fusion:
                feed = [[tokens[0]]] * rows
            else:
                feed = [[self._pad_id if seq.done else tok] for seq, tok in zip(seqs, tokens)]
            next_ids = torch.tensor(feed, dtype=torch.long, device=self.device)
            mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=-1)
            pos = pos[:, -1:] + 1
            logits, cache = self._forward(next_ids, mask, pos, cache)

    def _pad_left(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One forward pass; returns float32 logits of the last position and the cache."""
        import torch

        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True}
        if cache is not None:
            kwargs[self._cache_arg] = cache
        if self._logits_to_keep:
            # Prefill: skip the vocabulary projection of every prompt position but the last.
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode():
            out = self._model(**kwargs)
            return out.logits[:, -1, :].float(), out.get(self._cache_arg)

    def _pick(self, logits: torch.Tensor, opts: DecodeOptions, sampler: Any, block_eos: bool) -> torch.Tensor:
        """Greedy argmax at temperature 0, else temperature + nucleus sampling."""
        import torch

        with torch.inference_mode():
            if block_eos and self._eos_ids:
                logits = logits.clone()
                logits[:, list(self._eos_ids)] = -math.inf
            if opts.temperature <= 0:
                return logits.argmax(-1)
            scaled = logits / opts.temperature
            if opts.top_p < 1.0:
                sorted_logits, order = scaled.sort(-1, descending=True)
                probs = sorted_logits.softmax(-1)
                # Drop a token once the mass before it already reaches top_p (keeps >= 1 token).
                drop = (probs.cumsum(-1) - probs) >= opts.top_p
                sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
                scaled = torch.full_like(scaled, -math.inf).scatter(-1, order, sorted_logits)
            return torch.multinomial(scaled.softmax(-1), 1, generator=sampler).squeeze(-1)

    def _pick_fused(
        self, logits: torch.Tensor, fusion: Fusion, opts: DecodeOptions, sampler: Any, block_eos: bool
    ) -> tuple[int, list[float]]:
        """Fuse the rows' next-token distributions, pick one token; per-row log-prob of it."""
        import torch

        with torch.inference_mode():
            logp = logits.log_softmax(-1)
            if fusion == "mixture":
                fused = logp.logsumexp(0) - math.log(logp.shape[0])
            else:
                fused = logp.mean(0)
            token = int(self._pick(fused[None], opts, sampler, block_eos)[0])
            return token, logp[:, token].tolist()


def _validate_messages(messages: Sequence[Mapping[str, str]]) -> list[Message]:
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
