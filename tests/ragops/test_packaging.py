"""GGUF packaging: base and base+LoRA into the registry, lineage, loading back, bad input, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragops.artifacts import NAME_RE, Registry, adapter_dir, apply_model
from ragops.errors import InputError, ModelNotFoundError
from ragops.packaging import package_model, sha256_file

#: A few token ids of the tiny tokenizer (vocab ~550), prompt-like: BOS, words, punctuation.
IDS = [1, 5, 77, 300, 12, 400, 9, 250, 33, 120]


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry", cache_dir=tmp_path / "cache")


@pytest.fixture(scope="session")
def tiny_lora(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny Llama whose B matrices are non-zero, so merging changes logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("tiny-lora")
    peft_model.save_pretrained(out)
    return out


def logits_of(model: Any, ids: list[int] = IDS) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def load_hf(folder: Path, gguf_file: str | None = None, adapter: Path | None = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from ragops.retrieval.model_loading import merge_adapter

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
    return merge_adapter(model, adapter) if adapter else model


def load_package(registry: Registry, ref: str) -> Any:
    path = registry.gguf_path(ref)
    return load_hf(path.parent, path.name)


def assert_untouched(registry: Registry) -> None:
    """No artifact, alias or staging folder: the registry is as a failed command found it."""
    root = Path(registry.storage.base)
    assert registry.names() == [] and "gguf-latest" not in registry.aliases()
    assert not any((root / "artifacts").glob("*")) if (root / "artifacts").exists() else True
    assert not any((root / ".tmp").glob("*")) if (root / ".tmp").exists() else True


@pytest.mark.parametrize(("quant", "tol", "min_agree"), [("f16", 0.02, 1.0), ("q8_0", 0.5, 0.9)])
def test_package_base_reloads_close_to_source(
    registry: Registry, tiny_llm_dir: Path, quant: str, tol: float, min_agree: float
) -> None:
    """A base HF folder → GGUF; transformers reads it back with logits close to the float32 source."""
    art = package_model(str(tiny_llm_dir), registry=registry, quant=quant)
    assert NAME_RE.match(art.name) and art.name.startswith("gguf-") and art.kind == "gguf" and art.format == "gguf"
    assert registry.resolve("gguf-latest") == art.name
    path = registry.gguf_path(art.name)
    assert path == Path(registry.storage.base) / "artifacts" / art.name / "model" / "model.gguf"
    assert (path.parents[1] / "artifact.json").is_file() and art.files == ["model.gguf"]
    assert not list((Path(registry.storage.base) / ".tmp").iterdir())
    lin = art.lineage
    assert lin["sha256"] == sha256_file(path) and lin["size_bytes"] == path.stat().st_size
    assert lin["quant"] == quant and lin["base_model"] == str(tiny_llm_dir) == art.base_model
    assert lin["source"] == str(tiny_llm_dir) and lin["source_artifact"] is None and lin["adapter"] is None
    assert set(lin["tools"]) == {"gguf", "llama_cpp", "transformers", "torch", "peft", "ragops"} and lin["tools"]["gguf"]
    assert registry.get(art.name).lineage == lin  # round-trips through artifact.json
    ref, got = logits_of(load_hf(tiny_llm_dir)), logits_of(load_package(registry, art.name))
    assert (got - ref).abs().max().item() < tol
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= min_agree
    assert registry.find_package(str(tiny_llm_dir), quant=quant).name == art.name
    assert registry.find_package(str(tiny_llm_dir), quant="q4_k_m") is None


def test_q8_0_is_smaller_and_looser_than_f16(registry: Registry, tiny_llm_dir: Path) -> None:
    f16 = package_model(str(tiny_llm_dir), registry=registry, quant="f16", name="tiny-f16")
    q8 = package_model(str(tiny_llm_dir), registry=registry, quant="q8_0", name="tiny-q8")
    assert q8.lineage["size_bytes"] < 0.75 * f16.lineage["size_bytes"]
    ref = logits_of(load_hf(tiny_llm_dir))
    err_f16 = (logits_of(load_package(registry, "tiny-f16")) - ref).abs().max()
    err_q8 = (logits_of(load_package(registry, "tiny-q8")) - ref).abs().max()
    assert err_f16 < err_q8
    assert registry.resolve("gguf-latest") == "tiny-q8"
    assert registry.aliases()["gguf-latest"]["previous"] == ["tiny-f16"]


def test_package_adapter_matches_merged_model(registry: Registry, tiny_llm_dir: Path, tiny_lora: Path) -> None:
    """base + LoRA → GGUF: logits follow the merged model, not the base; lineage names both."""
    sft = registry.publish(tiny_lora, kind="sft", base_model=str(tiny_llm_dir), metrics={"eval_loss": 1.5}, data_hash="h")
    art = package_model("sft-latest", registry=registry, quant="f16", name="tiny-lora.f16")
    assert art.name == "tiny-lora.f16" and art.parent == sft.name and art.metrics == {"eval_loss": 1.5}
    assert art.lineage["source"] == "sft-latest" and art.lineage["source_artifact"] == art.lineage["adapter"] == sft.name
    assert art.base_model == art.lineage["base_model"] == str(tiny_llm_dir) and art.data_hash == "h"
    base = logits_of(load_hf(tiny_llm_dir))
    merged = logits_of(load_hf(tiny_llm_dir, adapter=adapter_dir(sft.name, registry=registry)))
    got = logits_of(load_package(registry, art.name))
    assert (merged - base).abs().max().item() > 0.5  # the adapter matters
    assert (got - merged).abs().max().item() < 0.02
    assert registry.find_package(str(tiny_llm_dir), sft.name).name == art.name
    assert registry.find_package(str(tiny_llm_dir), "sft-latest", quant="f16").name == art.name
    assert registry.find_package(str(tiny_llm_dir)) is None  # no package of the bare base yet


def test_apply_model_uses_the_gguf_and_adapter_dir_refuses(tmp_path: Path, tiny_llm_dir: Path) -> None:
    from ragops.config import load_settings
    from ragops.model_registry import resolve_model

    settings = load_settings([], [], data_dir=tmp_path / "home", environ={})
    registry = Registry.from_settings(settings)
    art = package_model(str(tiny_llm_dir), registry=registry, quant="q8_0", name="tiny-q8")
    applied = apply_model(settings, "gguf-latest")
    assert applied.generator.model == str(registry.gguf_path(art.name)) and applied.generator.adapter is None
    spec = resolve_model(applied.generator.model, kind="generator")
    assert spec.gguf_file == "model.gguf" and spec.locate() == registry.gguf_path(art.name).parent
    with pytest.raises(ModelNotFoundError, match="packaged GGUF model .*--model tiny-q8"):
        adapter_dir("tiny-q8", registry=registry)
    with pytest.raises(ModelNotFoundError, match="packaged GGUF"):
        registry.local_dir("tiny-q8")
    with pytest.raises(InputError, match="already a packaged GGUF"):
        package_model("tiny-q8", registry=registry)


def test_bad_input_is_one_line_and_leaves_the_registry_untouched(
    registry: Registry, tiny_llm_dir: Path, tiny_lora: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="unsupported quantization 'q3_k'; supported: f16, q8_0, q4_k_m"):
        package_model(str(tiny_llm_dir), registry=registry, quant="q3_k")
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'.*nor an artifact or alias in the registry"):
        package_model("no-such-model", registry=registry)
    with pytest.raises(ModelNotFoundError, match="is a embedder, not a generator"):
        package_model("minilm-l6", registry=registry)
    with pytest.raises(InputError, match="--as 'Bad Name'"):
        package_model(str(tiny_llm_dir), registry=registry, name="Bad Name")
    with pytest.raises(InputError, match="--as 'gguf-latest'.*already exists"):
        package_model(str(tiny_llm_dir), registry=registry, name="gguf-latest")
    with pytest.raises(InputError, match="LoRA adapter folder"):
        package_model(str(tiny_lora), registry=registry)
    gpt2 = _tiny_gpt2(tmp_path / "gpt2")
    with pytest.raises(InputError, match="cannot package a 'gpt2' model as GGUF.*llama-family"):
        package_model(str(gpt2), registry=registry)
    assert_untouched(registry)
    reward = registry.publish(tiny_lora, kind="reward", base_model=str(tiny_llm_dir), task="seq-cls")
    sft = registry.publish(tiny_lora, kind="sft", base_model=str(tiny_llm_dir))
    with pytest.raises(InputError, match="is a reward model .*not a generator"):
        package_model(reward.name, registry=registry)
    with pytest.raises(InputError, match=f"--as '{sft.name}'.*already exists"):
        package_model(str(tiny_llm_dir), registry=registry, name=sft.name)
    assert [a.kind for a in registry.list()] == ["reward", "sft"]


def _tiny_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(
    registry: Registry, tiny_llm_dir: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    """The file's header and metadata are on disk when the write fails: no artifact, no temp folder."""
    import gguf

    original = gguf.GGUFWriter.write_kv_data_to_file
    seen: list[int] = []

    def fail_after_metadata(self: Any) -> None:
        original(self)
        self.fout[0].flush()
        seen.append(Path(self.path).stat().st_size if self.path else 0)
        raise exc

    monkeypatch.setattr(gguf.GGUFWriter, "write_kv_data_to_file", fail_after_metadata)
    with pytest.raises(type(exc)):
        package_model(str(tiny_llm_dir), registry=registry, quant="q8_0", name="half")
    assert seen and seen[0] > 0  # part of the file had been written
    assert_untouched(registry)
    assert not registry.has("half")


def test_remote_registry_uploads_and_downloads(tmp_path: Path, tiny_llm_dir: Path) -> None:
    """On object storage the manifest goes last; gguf_path downloads the file once into the cache."""
    reg = Registry("mock:///bucket/registry", cache_dir=tmp_path / "cache")
    art = package_model(str(tiny_llm_dir), registry=reg, quant="q8_0")
    assert reg.storage.list_files("artifacts", art.name) == ["artifact.json", "model/model.gguf"]
    local = reg.gguf_path("gguf-latest")
    assert local == tmp_path / "cache" / art.name / "model" / "model.gguf"
    assert sha256_file(local) == art.lineage["sha256"]
    assert not any((tmp_path / "cache" / ".tmp").iterdir())


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - a broken native build raises more than ImportError
        pytest.skip(f"llama-cpp-python is not importable here ({exc}): pip install llama-cpp-python")
    return llama_cpp


def test_llama_cpp_loads_the_package(registry: Registry, tiny_llm_dir: Path, tiny_lora: Path) -> None:
    """llama.cpp reads the written tokenizer and weights: same token ids, same logits as the merged model."""
    import numpy as np
    from transformers import AutoTokenizer

    llama_cpp = _llama_cpp()
    sft = registry.publish(tiny_lora, kind="sft", base_model=str(tiny_llm_dir))
    art = package_model(sft.name, registry=registry, quant="f16")
    llm = llama_cpp.Llama(model_path=str(registry.gguf_path(art.name)), n_ctx=256, verbose=False, logits_all=True)
    try:
        text = "<|im_start|>user\nwhere is the answer?<|im_end|>"
        expected = AutoTokenizer.from_pretrained(tiny_llm_dir)(text).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected
        llm.eval(IDS)
        got = np.array(llm.scores[: len(IDS)])
    finally:
        llm.close()
    merged = logits_of(load_hf(tiny_llm_dir, adapter=adapter_dir(sft.name, registry=registry))).numpy()
    assert np.abs(got - merged).max() < 0.05


def test_q4_k_m_through_llama_cpp(registry: Registry, tiny_llm_dir: Path) -> None:
    import gguf

    llama_cpp = _llama_cpp()
    art = package_model(str(tiny_llm_dir), registry=registry, quant="q4_k_m")
    path = registry.gguf_path(art.name)
    assert art.lineage["quant"] == "q4_k_m" and art.lineage["tools"]["llama_cpp"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"]  # the f16 step is gone
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert any(t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) for t in reader.tensors)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    try:
        llm.eval(IDS)
    finally:
        llm.close()


def test_q4_k_m_without_llama_cpp_fails_before_any_work(
    registry: Registry, tiny_llm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what a missing install looks like to import
    with pytest.raises(InputError, match="q4_k_m is quantized by llama.cpp: llama-cpp-python is not installed.*pip install llama-cpp-python"):
        package_model(str(tiny_llm_dir), registry=registry, quant="q4_k_m")
    assert_untouched(registry)
    assert package_model(str(tiny_llm_dir), registry=registry, quant="f16").lineage["tools"]["llama_cpp"] is None


# -- CLI -------------------------------------------------------------------------------------


def _cli() -> Any:
    import typer

    from ragops.commands.models import models_app

    app = typer.Typer()
    app.add_typer(models_app, name="models")
    return app


def test_cli_package_list_show(tmp_path: Path, tiny_llm_dir: Path) -> None:
    from typer.testing import CliRunner

    home = ["--data-dir", str(tmp_path / "home")]
    runner = CliRunner()
    result = runner.invoke(_cli(), ["models", "package", str(tiny_llm_dir), "--quant", "f16", "--as", "tiny-f16", "--json", *home])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["name"] == "tiny-f16" and data["lineage"]["quant"] == "f16" and data["aliases"] == ["gguf-latest"]
    assert data["location"].endswith("artifacts/tiny-f16/model/model.gguf") and Path(data["location"]).is_file()
    assert "package:" in result.stderr  # the progress lines (stderr is not a terminal here)
    listed = json.loads(runner.invoke(_cli(), ["models", "list", "--json", *home]).stdout)
    row = next(a for a in listed["artifacts"] if a["name"] == "tiny-f16")
    assert row["format"] == "gguf" and row["lineage"]["sha256"] == data["lineage"]["sha256"]
    table = runner.invoke(_cli(), ["models", "list", *home]).stdout
    assert "tiny-f16" in table and "f16 0.1 MiB" in table
    shown = runner.invoke(_cli(), ["models", "show", "gguf-latest", *home])
    assert shown.exit_code == 0 and "lineage" in shown.stdout and data["lineage"]["sha256"][:16] in shown.stdout
    bad = runner.invoke(_cli(), ["models", "package", str(tiny_llm_dir), "--quant", "q2", *home])
    assert bad.exit_code == 2 and "supported: f16, q8_0, q4_k_m" in bad.stderr
    taken = runner.invoke(_cli(), ["models", "package", str(tiny_llm_dir), "--as", "tiny-f16", *home])
    assert taken.exit_code == 2 and "already exists" in taken.stderr


def test_cli_promote_package(tmp_path: Path, tiny_llm_dir: Path, tiny_lora: Path) -> None:
    """promote --package: the gate judges the source's metrics, then the new GGUF gets the alias."""
    from typer.testing import CliRunner

    from ragops.config import load_settings

    settings = load_settings([], [], data_dir=tmp_path / "home", environ={})
    registry = Registry.from_settings(settings)
    good = registry.publish(tiny_lora, kind="sft", base_model=str(tiny_llm_dir), metrics={"eval_loss": 1.0})
    worse = registry.publish(tiny_lora, kind="sft", base_model=str(tiny_llm_dir), metrics={"eval_loss": 2.0})
    home = ["--data-dir", str(tmp_path / "home")]
    runner = CliRunner()
    result = runner.invoke(
        _cli(), ["models", "promote", good.name, "--alias", "prod", "--package", "q8_0", "--require-metric", "eval_loss", "--json", *home]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    pkg = registry.get("prod")
    assert data["target"] == pkg.name == data["package"]["name"] and pkg.is_gguf and pkg.lineage["adapter"] == good.name
    assert pkg.metrics == {"eval_loss": 1.0} and data["gate"]["passed"]
    refused = runner.invoke(
        _cli(), ["models", "promote", worse.name, "--alias", "prod", "--package", "q8_0", "--require-metric", "eval_loss", *home]
    )
    assert refused.exit_code == 2 and "refused" in refused.stderr
    assert [a.name for a in registry.list(kind="gguf")] == [pkg.name]  # refused before packaging
    assert registry.resolve("prod") == pkg.name


# -- the real packaged model --------------------------------------------------------------


@pytest.mark.slow
def test_package_smollm2_q8_0(registry: Registry) -> None:
    """The packaged SmolLM2 (Q4_1 GGUF) → q8_0: 272 tensors (tied output), argmax as the source."""
    import gguf

    from ragops.model_registry import resolve_model

    spec = resolve_model("smollm2-135m-instruct", kind="generator")
    try:
        folder = spec.locate()
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    art = package_model("smollm2-135m-instruct", registry=registry, quant="q8_0")
    path = registry.gguf_path(art.name)
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == 272 and "output.weight" not in {t.name for t in reader.tensors}
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=spec.gguf_file)
    ids = tok("The capital of France is Paris, and the capital of Germany is").input_ids
    ref = logits_of(load_hf(folder, spec.gguf_file), ids)
    got = logits_of(load_hf(path.parent, path.name), ids)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9
    assert got[-1].argmax() == ref[-1].argmax()
