"""The vLLM engine for GPU nodes: vLLM's async engine behind :class:`GeneratorBase`'s API.

vLLM does what a GPU serving replica needs and nothing here should re-implement: paged KV
cache, continuous batching, CUDA graphs, tensor parallelism and multi-LoRA batching. This
module adapts it to ragops' generator interface:

* one ``AsyncLLMEngine`` per base model and process, running on its own event-loop thread;
  every :class:`VllmGenerator` on that base (the base itself and each LoRA adapter the serving
  deployment multiplexes) submits to it, so adapters share the GPU weights and are batched
  together by vLLM (``generator.vllm.max_loras`` resident at once);
* a registry LoRA adapter becomes a ``LoRARequest`` on each of its requests;
* prompts are built with the model's transformers tokenizer (the same chat template as the
  transformers engine) and sent as token ids, and the generated ids go through the same
  :class:`~ragops.retrieval.decoding.SequenceState` as every engine (stop strings, runaway cut,
  streaming hold-back), so answers end the same way on every engine; a finished sequence aborts
  its vLLM request.

vLLM's wheels need CUDA, so it is imported on first load only: on a machine without it,
``generator.engine: vllm`` is one error naming the install command.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Generator as PyGenerator
from collections.abc import Mapping, Sequence
from typing import Any

from ragops.config import GeneratorConfig, VllmConfig
from ragops.errors import ConfigError, ModelNotFoundError
from ragops.model_registry import resolve_model
from ragops.retrieval.decoding import DecodeOptions, GenerationResult, ResultStream, RunStats, SequenceState, sequence_result
from ragops.retrieval.generator_base import GeneratorBase, HFChatMixin
from ragops.retrieval.model_loading import locate_generator, resolve_adapter

log = logging.getLogger(__name__)

VLLM_INSTALL = "vLLM is not installed (it needs a CUDA node): pip install vllm"


def import_vllm() -> Any:
    """``vllm``, or a :class:`ConfigError` naming the install command."""
    try:
        import vllm
    except ImportError:
        raise ConfigError(f"generator.engine vllm: {VLLM_INSTALL}") from None
    return vllm


class _Engine:
    """One vLLM ``AsyncLLMEngine`` and the event loop thread it runs on."""

    def __init__(self, model: str, tokenizer: str, settings: VllmConfig, enable_lora: bool) -> None:
        vllm = import_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()
        args = AsyncEngineArgs(
            model=model,
            tokenizer=tokenizer,
            tensor_parallel_size=settings.tensor_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len,
            dtype=settings.dtype,
            enforce_eager=settings.enforce_eager,
            enable_lora=enable_lora,
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
        )

        async def build() -> Any:
            return vllm.AsyncLLMEngine.from_engine_args(args)

        try:
            self.engine = asyncio.run_coroutine_threadsafe(build(), self.loop).result()
        except Exception as exc:  # noqa: BLE001 - vLLM raises many types for a model it cannot load
            raise ModelNotFoundError(f"vLLM could not load generator '{model}': {exc}") from None
        self.lora_ids: dict[str, int] = {}


#: Engines by (model, settings), shared by the base generator and its adapters in a process.
_ENGINES: dict[tuple[str, str], _Engine] = {}
_ENGINES_LOCK = threading.Lock()


class VllmGenerator(HFChatMixin, GeneratorBase):
    """A chat model on vLLM (GPU), optionally with a LoRA adapter, behind :class:`GeneratorBase`'s API.

    Args:
        cfg: Generator settings; ``cfg.vllm`` holds tensor parallelism, memory and LoRA limits.
    """

    engine = "vllm"
    concurrent = True

    def __init__(self, cfg: GeneratorConfig | None = None) -> None:
        super().__init__(cfg)
        self._lock = threading.Lock()
        self._engine: _Engine | None = None
        self._tokenizer: Any = None
        self._lora: Any = None
        self._max_context = 0

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def warm_up(self) -> None:
        """Start (or join) the vLLM engine for the base model and resolve the adapter."""
        if self._engine is not None:
            return
        with self._lock:
            if self._engine is None:
                self._load()

    def _load(self) -> None:
        vllm = import_vllm()
        from transformers import AutoTokenizer

        spec = resolve_model(self.cfg.model, kind="generator")
        path = locate_generator(spec)
        model = str(path / spec.gguf_file) if spec.gguf_file else str(path)
        extra = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path), **extra)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"vLLM engine: could not load the tokenizer of '{self.cfg.model}': {exc}") from None
        key = (model, self.cfg.vllm.model_dump_json())
        with _ENGINES_LOCK:
            engine = _ENGINES.get(key)
            if engine is None:
                started = time.perf_counter()
                # LoRA is enabled whenever adapters may come (serving multiplexes them later).
                engine = _Engine(model, str(path), self.cfg.vllm, enable_lora=True)
                _ENGINES[key] = engine
                log.info("vLLM engine for %s started in %.1f s", self.cfg.model, time.perf_counter() - started)
        if self.cfg.adapter:
            folder = resolve_adapter(self.cfg.adapter)
            lora_id = engine.lora_ids.setdefault(str(folder), len(engine.lora_ids) + 1)
            self._lora = vllm.lora.request.LoRARequest(folder.name, lora_id, str(folder))
        config = getattr(engine.engine, "model_config", None)
        self._max_context = int(getattr(config, "max_model_len", 0) or self.cfg.vllm.max_model_len or 4096)
        self._engine = engine

    @property
    def max_context_tokens(self) -> int:
        self.warm_up()
        return self._max_context

    def _sampling(self, opts: DecodeOptions, max_new: int) -> Any:
        from vllm import SamplingParams

        # Stop strings and the runaway cut stay ours (SequenceState), so answers end the same on
        # every engine. generator.repetition_penalty / no_repeat_ngram_size are not applied here:
        # vLLM's repetition_penalty also counts the prompt (in RAG: the passages, which answers
        # should quote), and V1 has no per-request logits processor to apply ours.
        return SamplingParams(
            max_tokens=max_new,
            min_tokens=opts.min_new_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            seed=opts.seed if opts.temperature > 0 else None,
            detokenize=False,
        )

    def _submit(self, messages: Sequence[Mapping[str, str]], options: dict[str, Any], t0: float) -> tuple[Any, SequenceState, RunStats, str]:
        import queue

        opts = self._options(**options)
        ids, max_new = self._prepare(messages, opts.max_new_tokens)
        seq = SequenceState(self._tokenizer, opts.stop, max_new, len(ids), stop_on_repeat=opts.stop_on_repeat)
        stats = RunStats(t0)
        out: queue.SimpleQueue = queue.SimpleQueue()
        request_id = uuid.uuid4().hex
        assert self._engine is not None
        engine = self._engine.engine
        eos = self._tokenizer.eos_token_id
        sampling = self._sampling(opts, max_new)
        lora = self._lora

        async def run() -> None:
            seen = 0
            try:
                async for output in engine.generate({"prompt_token_ids": ids}, sampling, request_id, lora_request=lora):
                    tokens = output.outputs[0].token_ids
                    now = time.perf_counter()
                    for tok in tokens[seen:]:
                        if stats.first_token_at is None:
                            stats.first_token_at = now
                        delta = seq.push(int(tok), int(tok) == eos)
                        if delta:
                            out.put(delta)
                        if seq.done:
                            seq.finished_at = now
                            break
                    seen = len(tokens)
                    if seq.done:
                        await engine.abort(request_id)
                        break
                out.put(None)
            except Exception as exc:  # noqa: BLE001 - handed to the caller's thread
                out.put(exc)

        future = asyncio.run_coroutine_threadsafe(run(), self._engine.loop)
        return (out, future), seq, stats, request_id

    def stream(self, messages: Sequence[Mapping[str, str]], **options: Any) -> ResultStream[GenerationResult]:
        """Like :meth:`generate`, but yields text deltas as vLLM produces tokens."""
        t0 = time.perf_counter()
        self.warm_up()
        (out, future), seq, stats, request_id = self._submit(messages, options, t0)
        engine = self._engine

        def run() -> PyGenerator[str, None, GenerationResult]:
            try:
                while (item := out.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                if not seq.done and engine is not None:
                    future.cancel()
                    asyncio.run_coroutine_threadsafe(engine.engine.abort(request_id), engine.loop)
            return sequence_result(seq, stats)

        return ResultStream(run())

    def generate_batch(self, batch: Sequence[Sequence[Mapping[str, str]]], **options: Any) -> list[GenerationResult]:
        """Replies to several chats; vLLM batches them (and whatever else is running) itself."""
        streams = [self.stream(messages, **options) for messages in batch]
        return [s.collect() for s in streams]

