"""The llama.cpp engine on the packaged SmolLM2 GGUF: API parity, batching, prefix sharing, errors."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by scripts/setup.sh")

from ragops.config import GeneratorConfig
from ragops.errors import ConfigError, InputError, ModelNotFoundError
from ragops.model_registry import resolve_model
from ragops.retrieval.engines import choose_engine, make_generator
from ragops.retrieval.llamacpp_engine import LlamaCppGenerator

SYSTEM = "You answer questions about GPUs in one short sentence."
QUESTIONS = ["What is MIG?", "What does MPS share?", "Name a GPU vendor.", "What is CUDA?"]


def chat(question: str, system: str = SYSTEM) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def packaged_gguf() -> Path:
    spec = resolve_model("smollm2-135m-instruct", kind="generator")
    return spec.locate() / spec.gguf_file


def plain_cfg(**extra: object) -> GeneratorConfig:
    # Penalties and the runaway cut off, so every token is the model's argmax.
    return GeneratorConfig(max_new_tokens=12, repetition_penalty=1.0, no_repeat_ngram_size=0, stop_on_repeat=False, **extra)


@pytest.fixture(scope="module")
def llama() -> LlamaCppGenerator:
    gen = LlamaCppGenerator(plain_cfg(), gguf_path=packaged_gguf())
    gen.warm_up()
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def transformers_gen():
    from ragops.retrieval.generation import Generator

    gen = Generator(plain_cfg())
    gen.warm_up()
    return gen


def test_chat_template_and_tokens_match_transformers(llama, transformers_gen) -> None:
    msgs = chat("What is MIG and when would I use it instead of MPS?")
    assert llama.apply_chat_template(msgs) == transformers_gen.apply_chat_template(msgs)
    assert llama.apply_chat_template(msgs, tokenize=True) == transformers_gen.apply_chat_template(msgs, tokenize=True)
    text = "Multi-Instance GPU partitions an A100 into seven instances; café 東京 🙂."
    assert llama.count_tokens(text) == transformers_gen.count_tokens(text)
    assert llama.truncate_text(text, 5) == transformers_gen.truncate_text(text, 5)
    assert llama.max_context_tokens == min(8192, transformers_gen.max_context_tokens)


def test_generate_reports_usage_finish_reason_and_timings(llama) -> None:
    result = llama.generate(chat(QUESTIONS[0]), max_new_tokens=6, min_new_tokens=6)
    assert result.finish_reason == "length"
    assert result.completion_tokens == 6
    assert result.prompt_tokens == len(llama.apply_chat_template(chat(QUESTIONS[0]), tokenize=True))
    t = result.timings
    assert 0 < t.time_to_first_token_s <= t.total_s and t.tokens_per_s > 0
    assert result.text


def test_stream_deltas_concatenate_to_the_result(llama) -> None:
    stream = llama.stream(chat(QUESTIONS[1]))
    deltas = list(stream)
    assert len(deltas) > 1
    assert "".join(deltas) == stream.result.text


def test_stop_sequence_is_trimmed_and_ends_generation(llama) -> None:
    free = llama.generate(chat(QUESTIONS[0]), max_new_tokens=12, min_new_tokens=12).text
    words = free.split()
    assert len(words) >= 3
    stop = " " + words[2]
    result = llama.generate(chat(QUESTIONS[0]), max_new_tokens=12, stop=[stop])
    assert result.finish_reason == "stop"
    assert stop not in result.text and free.startswith(result.text)


def test_batch_equals_one_at_a_time_and_shares_decode_steps(llama) -> None:
    alone = [llama.generate(chat(q)).text for q in QUESTIONS]
    steps_before = llama.batcher.steps
    batch = llama.generate_batch([chat(q) for q in QUESTIONS])
    assert [r.text for r in batch] == alone
    assert llama.batcher.max_sequences_in_step >= len(QUESTIONS)
    # One decode call advances every sequence: far fewer calls than tokens generated.
    assert llama.batcher.steps - steps_before < sum(r.completion_tokens for r in batch)


def test_concurrent_streams_from_threads_run_in_the_same_steps(llama) -> None:
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(QUESTIONS))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = llama.generate(chat(QUESTIONS[i]), max_new_tokens=12, min_new_tokens=12).text

    steps_before = llama.batcher.steps
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == len(QUESTIONS)
    assert llama.batcher.steps - steps_before < 12 * len(QUESTIONS)


def test_system_prefix_is_computed_once_and_changes_nothing() -> None:
    shared = LlamaCppGenerator(plain_cfg(), gguf_path=packaged_gguf())
    unshared = LlamaCppGenerator(plain_cfg(llamacpp={"prefix_cache": False}), gguf_path=packaged_gguf())
    try:
        with_prefix = [shared.generate(chat(q)).text for q in QUESTIONS]
        assert shared.batcher.prefix_builds == 1
        assert [unshared.generate(chat(q)).text for q in QUESTIONS] == with_prefix
        assert unshared.batcher.prefix_builds == 0
        shared.generate(chat(QUESTIONS[0], system="Answer in French."))
        assert shared.batcher.prefix_builds == 2  # a new system prompt replaces the idle prefix
    finally:
        shared.close()
        unshared.close()


def test_sampling_is_seeded_per_request(llama) -> None:
    opts = {"temperature": 1.2, "top_p": 0.95, "max_new_tokens": 12, "min_new_tokens": 12}
    a = llama.generate(chat(QUESTIONS[2]), seed=7, **opts).text
    assert llama.generate(chat(QUESTIONS[2]), seed=7, **opts).text == a
    others = {llama.generate(chat(QUESTIONS[2]), seed=s, **opts).text for s in (1, 2, 3)}
    assert others - {a}
    # In a batch each request keeps its own sampler: the same seed gives the same sample.
    assert llama.generate_batch([chat(QUESTIONS[2]), chat(QUESTIONS[3])], seed=7, **opts)[0].text == a


def test_a_closed_stream_frees_its_sequence(llama) -> None:
    stream = llama.stream(chat(QUESTIONS[0]), max_new_tokens=64, min_new_tokens=64)
    next(stream)
    stream.close()
    llama.generate(chat(QUESTIONS[1]), max_new_tokens=2)  # the loop has run past the cancellation
    assert not llama.batcher._active and not llama.batcher._waiting


def test_bad_options_and_messages_are_input_errors(llama) -> None:
    with pytest.raises(InputError, match="temperature"):
        llama.generate(chat("hi"), temperature=-1)
    with pytest.raises(InputError, match="role"):
        llama.generate([{"role": "robot", "content": "hi"}])


def test_fused_decoding_is_a_clear_config_error(llama) -> None:
    with pytest.raises(ConfigError, match="FiD reader needs generator.engine: transformers"):
        llama.stream_fused([chat("a"), chat("b")])
    cfg = GeneratorConfig(engine="llamacpp", reader="fid")
    with pytest.raises(ConfigError, match="FiD reader"):
        make_generator(cfg)


def test_unloadable_files_name_the_model_and_engine(tmp_path: Path) -> None:
    junk = tmp_path / "broken.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelNotFoundError, match="llama.cpp could not load generator"):
        LlamaCppGenerator(GeneratorConfig(model=str(junk)), gguf_path=junk).warm_up()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LlamaCppGenerator(GeneratorConfig(), gguf_path=tmp_path / "missing.gguf").warm_up()


def test_llamacpp_on_a_non_gguf_model_says_to_package_it(tiny_llm_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RAGOPS_HOME", str(tmp_path))  # an empty registry
    with pytest.raises(ConfigError, match="ragops models package"):
        choose_engine(GeneratorConfig(model=str(tiny_llm_dir), engine="llamacpp"))


def test_missing_install_names_the_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an absent package looks like to import
    with pytest.raises(ConfigError, match="pip install llama-cpp-python"):
        choose_engine(GeneratorConfig(engine="llamacpp"))
