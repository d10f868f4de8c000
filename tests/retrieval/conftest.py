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

# ---------------------------------------------------------------------------------------
# Tiny causal LM (generation, readers)
# ---------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Retrieval-augmented generation answers questions from passages found in a document index.",
    "The capital of France is Paris. The Eiffel Tower was finished in 1889 for the World's Fair.",
    "Qdrant stores vectors; Ray Data embeds documents in parallel and writes them in batches.",
    "A passage is a chunk of a document, numbered in the prompt so that answers can cite it.",
    "Fusion-in-decoder reads every passage with the question and fuses the evidence while decoding.",
    "Café, naïve, Zürich, 東京 and emoji 🙂 exercise multi-byte UTF-8 in byte-level tokens.",
    "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.",
]

TINY_MAX_POSITIONS = 256


def _train_tokenizer() -> Any:
    """A byte-level BPE tokenizer with a ChatML template, trained in ~50 ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=TINY_MAX_POSITIONS,
    )


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama plus a real chat tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llm")
    tokenizer = _train_tokenizer()
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=TINY_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Wider than the default 0.02 so random logits have clear winners: greedy outputs are
        # stable against float noise (batched vs single rows).
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # EOS's logit is then always 0 while the best of ~600 random logits is ~+3.5: greedy never
    # ends early, so 'length' and stop-sequence tests are exact.
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


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
