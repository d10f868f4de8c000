"""The vLLM engine on a CUDA device: parity with transformers, concurrency, LoRA requests.

Marked ``gpu`` (deselected by default): run with ``python -m pytest -m gpu`` on a machine with
an NVIDIA GPU and ``pip install vllm``. The CPU-side parts (settings, selection, manifests) are
tested in tests/retrieval/test_engines.py and tests/ragops/cluster/test_cluster_kuberay.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

vllm = pytest.importorskip("vllm", reason="the vllm engine's tests need vLLM (pip install vllm)")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("the vllm engine's tests need a CUDA device", allow_module_level=True)

from ragops.config import GeneratorConfig  # noqa: E402
from ragops.retrieval.engines import choose_engine, make_generator  # noqa: E402
from ragops.retrieval.generation import Generator  # noqa: E402
from ragops.retrieval.vllm_engine import VllmGenerator  # noqa: E402

MSGS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a GPU?"}]


def plain_cfg(model: str, **extra: object) -> GeneratorConfig:
    return GeneratorConfig(model=model, max_new_tokens=16, repetition_penalty=1.0, no_repeat_ngram_size=0,
                           stop_on_repeat=False, vllm={"gpu_memory_utilization": 0.3, "max_model_len": 2048}, **extra)  # fmt: skip


@pytest.fixture(scope="module")
def vgen(tiny_llm_dir: Path) -> VllmGenerator:
    gen = VllmGenerator(plain_cfg(str(tiny_llm_dir)))
    gen.warm_up()
    return gen


def test_auto_picks_vllm_on_a_gpu(tiny_llm_dir: Path) -> None:
    assert choose_engine(GeneratorConfig(model=str(tiny_llm_dir))).engine == "vllm"


def test_greedy_output_matches_transformers(vgen: VllmGenerator, tiny_llm_dir: Path) -> None:
    hf = Generator(plain_cfg(str(tiny_llm_dir), device="cuda"))
    ref = hf.generate(MSGS, min_new_tokens=8, max_new_tokens=8)
    got = vgen.generate(MSGS, min_new_tokens=8, max_new_tokens=8)
    assert got.completion_tokens == 8 and got.finish_reason == "length"
    assert got.prompt_tokens == ref.prompt_tokens
    assert got.text[:8] == ref.text[:8]


def test_stream_usage_stop_and_seed(vgen: VllmGenerator) -> None:
    stream = vgen.stream(MSGS, max_new_tokens=12, min_new_tokens=12)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text and stream.result.timings.time_to_first_token_s > 0
    words = stream.result.text.split()
    if len(words) >= 3:
        stop = " " + words[2]
        cut = vgen.generate(MSGS, max_new_tokens=12, stop=[stop])
        assert cut.finish_reason == "stop" and stop not in cut.text
    opts = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12, "seed": 5}
    assert vgen.generate(MSGS, **opts).text == vgen.generate(MSGS, **opts).text


def test_concurrent_requests_all_finish(vgen: VllmGenerator) -> None:
    out: dict[int, str] = {}

    def run(i: int) -> None:
        out[i] = vgen.generate([{"role": "user", "content": f"Count to {i}."}], max_new_tokens=8).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(out) == 8


def test_lora_adapter_is_a_lora_request(tiny_llm_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1.0)
    model.save_pretrained(tmp_path / "lora")
    base = make_generator(plain_cfg(str(tiny_llm_dir), engine="vllm"))
    tuned = make_generator(plain_cfg(str(tiny_llm_dir), engine="vllm", adapter=str(tmp_path / "lora")))
    a = base.generate(MSGS, min_new_tokens=8, max_new_tokens=8).text
    b = tuned.generate(MSGS, min_new_tokens=8, max_new_tokens=8).text
    assert a != b
