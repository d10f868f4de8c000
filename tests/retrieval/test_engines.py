"""generator.engine: what `auto` picks and why, explicit engines, and one question per engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ragops.artifacts import Registry
from ragops.config import GeneratorConfig, load_settings
from ragops.errors import ConfigError
from ragops.model_registry import resolve_model
from ragops.packaging import package_model
from ragops.retrieval.engines import choose_engine, make_generator
from ragops.retrieval.generation import Generator

needs_llama = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llama_cpp") is None, reason="llama-cpp-python is built by scripts/setup.sh"
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """An empty registry that the engines' package lookup reads (through RAGOPS_HOME)."""
    monkeypatch.setenv("RAGOPS_HOME", str(tmp_path / "home"))
    for key in [k for k in __import__("os").environ if k.startswith("RAGOPS_FINETUNE__")]:
        monkeypatch.delenv(key)
    return Registry.from_settings(load_settings())


def shipped_gguf() -> Path:
    spec = resolve_model("smollm2-135m-instruct", kind="generator")
    return spec.locate() / spec.gguf_file


@needs_llama
def test_auto_runs_the_shipped_gguf_on_llamacpp(home: Registry) -> None:
    choice = choose_engine(GeneratorConfig())
    assert choice.engine == "llamacpp" and choice.gguf_path == shipped_gguf()
    assert "ships as a GGUF" in choice.reason


def test_auto_falls_back_to_transformers(home: Registry, tiny_llm_dir: Path) -> None:
    hf = choose_engine(GeneratorConfig(model=str(tiny_llm_dir)))
    assert hf.engine == "transformers" and "ragops models package" in hf.reason
    fid = choose_engine(GeneratorConfig(), need_fused=True)
    assert fid.engine == "transformers" and "FiD" in fid.reason
    explicit = choose_engine(GeneratorConfig(engine="transformers"))
    assert explicit.engine == "transformers" and explicit.gguf_path is None
    gen = make_generator(GeneratorConfig(reader="fid"))
    assert isinstance(gen, Generator) and gen.describe()["reason"] == fid.reason


def test_auto_without_llama_cpp_reads_the_gguf_with_transformers(home: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    import ragops.retrieval.engines as engines

    monkeypatch.setattr(engines, "installed", lambda module: module != "llama_cpp" and module != "vllm")
    choice = choose_engine(GeneratorConfig())
    assert choice.engine == "transformers" and "llama-cpp-python is not installed" in choice.reason


@needs_llama
def test_a_registry_package_wins_over_the_raw_model(home: Registry, tiny_llm_dir: Path) -> None:
    art = package_model(str(tiny_llm_dir), registry=home, quant="f16", name="tiny.f16")
    choice = choose_engine(GeneratorConfig(model=str(tiny_llm_dir)))
    assert choice.engine == "llamacpp" and choice.gguf_path == home.gguf_path(art.name)
    assert "tiny.f16" in choice.reason and "f16" in choice.reason
    # The same base with an adapter that has no package stays on transformers.
    other = choose_engine(GeneratorConfig(model=str(tiny_llm_dir), adapter=str(tiny_llm_dir.parent / "nope" / "adapter")))
    assert other.engine == "transformers"


def test_vllm_without_vllm_names_the_install(home: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an absent package looks like to import
    with pytest.raises(ConfigError, match="pip install vllm"):
        choose_engine(GeneratorConfig(engine="vllm"))
    assert choose_engine(GeneratorConfig(model="smollm2-135m-instruct")).engine != "vllm"


@needs_llama
def test_each_engine_answers_through_the_same_interface(home: Registry, tiny_llm_dir: Path) -> None:
    """transformers on the HF folder, llamacpp on its f16 package: same prompt, same contract."""
    package_model(str(tiny_llm_dir), registry=home, quant="f16", name="tiny.f16")
    cfg = GeneratorConfig(model=str(tiny_llm_dir), max_new_tokens=6, repetition_penalty=1.0, no_repeat_ngram_size=0,
                          stop_on_repeat=False)  # fmt: skip
    llama = make_generator(cfg)
    hf = make_generator(cfg.model_copy(update={"engine": "transformers"}))
    assert (llama.engine, hf.engine) == ("llamacpp", "transformers")
    try:
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
        assert llama.apply_chat_template(msgs, tokenize=True) == hf.apply_chat_template(msgs, tokenize=True)
        for gen in (llama, hf):
            res = gen.generate(msgs, min_new_tokens=6)
            assert res.finish_reason == "length" and res.completion_tokens == 6
            assert res.prompt_tokens == len(hf.apply_chat_template(msgs, tokenize=True))
            deltas = list(stream := gen.stream(msgs, min_new_tokens=6))
            assert "".join(deltas) == stream.result.text == res.text  # greedy: stream == generate
            assert [r.text for r in gen.generate_batch([msgs, msgs], min_new_tokens=6)] == [res.text, res.text]
    finally:
        llama.close()
