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
from typing import TYPE_CHECKING, Any

from ragops.config import GeneratorConfig
from ragops.errors import InputError, ModelNotFoundError
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

from ragops.retrieval.generator_base import (  # noqa: F401 - Message/ROLES are public here too
    FUSIONS,
    ROLES,
    Fusion,
    GeneratorBase,
    HFChatMixin,
    Message,
    validate_messages,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------


class Generator(HFChatMixin, GeneratorBase):
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

    engine = "transformers"
    supports_fused = True

    def __init__(self, cfg: GeneratorConfig | None = None) -> None:
        super().__init__(cfg)
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

    # -- generation ----------------------------------------------------------------------

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

    # -- internals -----------------------------------------------------------------------

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


