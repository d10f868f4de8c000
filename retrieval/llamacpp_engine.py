"""The llama.cpp engine: GGUF weights decoded by llama.cpp, concurrent requests batched together.

A 135M-parameter model read as float32 by transformers moves ~540 MB per decode step; llama.cpp
reads the quantized GGUF (q8_0: ~140 MB) with SIMD kernels, which is what makes CPU serving
fast (``benchmarks/engines.py``). This engine offers :class:`GeneratorBase`'s API on top of
:class:`~ragops.retrieval.llamacpp_batcher.LlamaBatcher`:

* tokenization, detokenization and the chat template come from the GGUF itself (the template
  is rendered with Jinja2 as transformers renders it), so no torch or transformers is loaded
  in a llama.cpp serving replica;
* ``stream``/``generate``/``generate_batch`` may be called from several threads at once: every
  call becomes a request of the batcher, and all of them advance in the same decode steps;
* the system prompt's KV state is computed once per replica and shared by every request that
  starts with it (``generator.llamacpp.prefix_cache``).

llama-cpp-python is imported on first load; a missing install is one error naming the command.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Generator as PyGenerator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ragops.config import GeneratorConfig
from ragops.errors import ConfigError, ModelNotFoundError
from ragops.retrieval.decoding import GenerationResult, ResultStream, RunStats, SequenceState, sequence_result
from ragops.retrieval.generator_base import GeneratorBase, Message, validate_messages
from ragops.retrieval.llamacpp_batcher import END, LlamaBatcher, Request, silence_llama_log

log = logging.getLogger(__name__)

LLAMACPP_INSTALL = (
    "llama-cpp-python is not installed: bash scripts/setup.sh builds it "
    "(or: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF' pip install llama-cpp-python)"
)


def import_llama_cpp() -> Any:
    """``llama_cpp``, or a :class:`ConfigError` naming the install command."""
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(f"generator.engine llamacpp: {LLAMACPP_INSTALL}") from None
    return llama_cpp


class _Detokenizer:
    """What :class:`SequenceState` needs of a tokenizer (``decode``), on llama.cpp's vocabulary."""

    def __init__(self, gen: LlamaCppGenerator) -> None:
        self._gen = gen

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return self._gen._detokenize(ids)


class LlamaCppGenerator(GeneratorBase):
    """A GGUF chat model on llama.cpp, behind :class:`GeneratorBase`'s API.

    Args:
        cfg: Generator settings; ``cfg.llamacpp`` holds threads, context, batch and GPU layers.
        gguf_path: The GGUF file (resolved by :func:`ragops.retrieval.engines.make_generator`).
    """

    engine = "llamacpp"
    concurrent = True

    def __init__(self, cfg: GeneratorConfig | None = None, *, gguf_path: str | Path) -> None:
        super().__init__(cfg)
        self.gguf_path = Path(gguf_path)
        self._lock = threading.Lock()
        self._model: Any = None
        self._ctx: Any = None
        self._batcher: LlamaBatcher | None = None
        self._template: Any = None
        self._specials: dict[str, str] = {}
        self._max_context = 0
        self._prefix_ids: dict[str, tuple[int, ...]] = {}
        self._detok = _Detokenizer(self)

    # -- loading -------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._batcher is not None

    def warm_up(self) -> None:
        """Load the GGUF into llama.cpp and start nothing else (the decode thread starts on demand).

        Raises:
            ConfigError: llama-cpp-python is not installed.
            ModelNotFoundError: llama.cpp cannot load the file.
        """
        if self._batcher is not None:
            return
        with self._lock:
            if self._batcher is None:
                self._load()

    def _load(self) -> None:
        llama_cpp = import_llama_cpp()
        from llama_cpp import _internals

        lc = self.cfg.llamacpp
        silence_llama_log()
        started = time.perf_counter()
        if not self.gguf_path.is_file():
            raise ModelNotFoundError(f"generator '{self.cfg.model}': GGUF file {self.gguf_path} does not exist")
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = lc.n_gpu_layers
        try:
            model = _internals.LlamaModel(path_model=str(self.gguf_path), params=mparams, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelNotFoundError(
                f"llama.cpp could not load generator '{self.cfg.model}' from {self.gguf_path}: {exc}"
            ) from None
        threads = lc.n_threads or _available_cpus()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = lc.n_ctx
        cparams.n_batch = lc.n_batch
        cparams.n_ubatch = lc.n_batch
        # One extra sequence id holds the shared system-prompt prefix.
        cparams.n_seq_max = lc.n_parallel + 1
        # A unified KV cache lets sequences share the prefix's cells instead of copying them.
        cparams.kv_unified = True
        cparams.n_threads = threads
        cparams.n_threads_batch = lc.n_threads_batch or threads
        if lc.flash_attn:
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        try:
            ctx = _internals.LlamaContext(model=model, params=cparams, verbose=False)
        except ValueError as exc:
            model.close()
            raise ModelNotFoundError(f"llama.cpp could not create a context for '{self.cfg.model}': {exc}") from None
        vocab_n = model.n_vocab()
        eos = {i for i in range(vocab_n) if llama_cpp.llama_vocab_is_eog(model.vocab, i)}
        meta = model.metadata()
        self._template = _compile_template(meta.get("tokenizer.chat_template"))
        self._specials = {
            "bos_token": _token_text(model, model.token_bos()),
            "eos_token": _token_text(model, model.token_eos()),
        }
        self._max_context = min(model.n_ctx_train() or lc.n_ctx, lc.n_ctx)
        self._model, self._ctx = model, ctx
        self._batcher = LlamaBatcher(
            ctx, n_vocab=vocab_n, eos_ids=frozenset(eos), n_ctx=lc.n_ctx, n_batch=lc.n_batch, n_parallel=lc.n_parallel
        )
        log.info(
            "generator %s loaded by llama.cpp from %s in %.1f s (%d threads, %d KV cells, %d parallel sequences)",
            self.cfg.model, self.gguf_path.name, time.perf_counter() - started, threads, lc.n_ctx, lc.n_parallel,
        )

    def close(self) -> None:
        """Stop the decode thread and free the llama.cpp context and model."""
        with self._lock:
            if self._batcher is not None:
                self._batcher.close()
                self._ctx.close()
                self._model.close()
                self._batcher = self._ctx = self._model = None

    def __del__(self) -> None:
        # Ray Serve's model multiplexer calls __del__ when it evicts an adapter's generator:
        # the decode thread and the native context must go then, not whenever GC runs.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer (interpreter shutdown)
            pass

    @property
    def max_context_tokens(self) -> int:
        self.warm_up()
        return self._max_context

    @property
    def batcher(self) -> LlamaBatcher:
        """The decode loop (loads the model on first access)."""
        self.warm_up()
        assert self._batcher is not None
        return self._batcher

    def describe(self) -> dict[str, Any]:
        lc = self.cfg.llamacpp
        return {**super().describe(), "gguf": self.gguf_path.name, "n_ctx": lc.n_ctx, "n_parallel": lc.n_parallel}

    # -- tokens and chat -----------------------------------------------------------------

    def _tokenize(self, text: str, *, special: bool) -> list[int]:
        # Special-token text ("<|im_start|>") is parsed as the token, as transformers does.
        add_bos = special and self._model.add_bos_token()
        return self._model.tokenize(text.encode("utf-8"), add_bos, True)

    def _detokenize(self, ids: Sequence[int]) -> str:
        return self._model.detokenize(list(ids), special=False).decode("utf-8", errors="replace")

    @property
    def _has_chat_template(self) -> bool:
        return self._template is not None

    def _render(self, msgs: list[Message], *, add_generation_prompt: bool = True) -> str:
        if self._template is None:
            text = "".join(f"{m['role']}: {m['content']}\n\n" for m in msgs)
            return text + "assistant:" if add_generation_prompt else text
        return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt, **self._specials)

    def _prefix_for(self, msgs: list[Message], ids: list[int]) -> tuple[int, ...]:
        """The tokens of the system message's part of the prompt, when they start ``ids``."""
        if not self.cfg.llamacpp.prefix_cache or msgs[0]["role"] != "system" or len(msgs) < 2:
            return ()
        key = msgs[0]["content"]
        prefix = self._prefix_ids.get(key)
        if prefix is None:
            prefix = tuple(self._tokenize(self._render(msgs[:1], add_generation_prompt=False), special=not self._has_chat_template))
            if len(self._prefix_ids) > 64:  # a handful of system prompts in practice; never unbounded
                self._prefix_ids.clear()
            self._prefix_ids[key] = prefix
        # Shared only if it is a strict token prefix (a template could merge tokens at the seam).
        if len(prefix) < len(ids) and tuple(ids[: len(prefix)]) == prefix:
            return prefix
        return ()

    # -- generation ----------------------------------------------------------------------

    def _request(self, messages: Sequence[Mapping[str, str]], options: dict[str, Any], t0: float) -> Request:
        opts = self._options(**options)
        ids, max_new = self._prepare(messages, opts.max_new_tokens)
        msgs = validate_messages(messages)
        seq = SequenceState(self._detok, opts.stop, max_new, len(ids), stop_on_repeat=opts.stop_on_repeat)
        return Request(prompt=ids, opts=opts, seq=seq, stats=RunStats(t0), prefix=self._prefix_for(msgs, ids))

    def stream(self, messages: Sequence[Mapping[str, str]], **options: Any) -> ResultStream[GenerationResult]:
        """Like :meth:`generate`, but yields text deltas as they are decoded.

        The prompt is checked and encoded at once (errors raise here); the request joins the
        decode loop when the stream is first iterated, and leaves it when closed.
        """
        t0 = time.perf_counter()
        self.warm_up()
        req = self._request(messages, options, t0)
        batcher = self.batcher

        def run() -> PyGenerator[str, None, GenerationResult]:
            batcher.submit(req)
            try:
                while (item := req.out.get()) is not END:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                if not req.seq.done:
                    batcher.cancel(req)
            return sequence_result(req.seq, req.stats)

        return ResultStream(run())

    def generate_batch(self, batch: Sequence[Sequence[Mapping[str, str]]], **options: Any) -> list[GenerationResult]:
        """Replies to several chats, all decoded together (one result per chat, in order).

        Each reply is what :meth:`generate` gives for that chat alone (greedy; with sampling,
        each chat has its own seeded sampler).
        """
        t0 = time.perf_counter()
        self.warm_up()
        requests = [self._request(messages, options, t0) for messages in batch]
        for req in requests:
            self.batcher.submit(req)
        results = []
        for req in requests:
            while (item := req.out.get()) is not END:
                if isinstance(item, BaseException):
                    for other in requests:
                        self.batcher.cancel(other)
                    raise item
            results.append(sequence_result(req.seq, req.stats))
        return results


def _available_cpus() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _token_text(model: Any, token: int) -> str:
    return model.token_get_text(token) if token >= 0 else ""


def _compile_template(source: str | None) -> Any:
    """The GGUF's chat template as a sandboxed Jinja2 template (what transformers renders)."""
    if not source:
        return None
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


__all__ = ["LLAMACPP_INSTALL", "LlamaCppGenerator", "import_llama_cpp"]
