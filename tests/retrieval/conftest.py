"""Fixtures for the retrieval tests.

Models here are tiny and built in the session (no download, no packaged weights): real
transformers code paths at millisecond cost. Session fixtures are shared: tests must not
mutate them (build a new ``Generator`` for other settings; loading the tiny model takes ~0.1 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ragops.retrieval.generation import Generator

# The tiny causal LM itself (``tiny_llm_dir``) lives in tests/conftest.py: CLI, serving and
# fine-tuning tests use it too.
from tests.conftest import CHATML_TEMPLATE, TINY_MAX_POSITIONS, _train_tokenizer  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_generator(tiny_llm_dir: Path) -> Generator:
    """A warmed-up Generator on the tiny model (shared: do not change its settings)."""
    from ragops.config import GeneratorConfig
    from ragops.retrieval.generation import Generator

    gen = Generator(GeneratorConfig(model=str(tiny_llm_dir), max_new_tokens=12))
    gen.warm_up()
    return gen


@pytest.fixture(scope="session")
def tiny_lora_dirs(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters for the tiny model: ``zero`` (peft's init, B = 0) and ``random``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = {}
    for name in ("zero", "random"):
        base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        if name == "random":
            torch.manual_seed(1)
            with torch.no_grad():
                for pname, param in peft_model.named_parameters():
                    if "lora_B" in pname:
                        param.normal_(0.0, 1.0)
        dirs[name] = tmp_path_factory.mktemp(f"lora-{name}")
        peft_model.save_pretrained(dirs[name])
    return dirs
