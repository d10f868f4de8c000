"""Fixtures for the fine-tuning tests: a tiny Llama base, data files, settings.

The base model is a real ``LlamaForCausalLM`` (2 layers, 32 wide) with the tiny byte-level BPE
chat tokenizer of the retrieval tests: every code path (TRL, peft, Ray Train, the registry, the
generator) is the production one, and a training step costs milliseconds.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import build_tiny_llama

#: Overrides that keep training tiny and fast (applied before a test's own).
FAST = (
    "finetune.data.runner=local",
    "finetune.lora.r=4",
    "finetune.lora.alpha=8",
    "finetune.sft.batch_size=2",
    "finetune.sft.learning_rate=0.01",
    "finetune.sft.max_length=256",
    "finetune.sft.save_steps=2",
    "finetune.reward.batch_size=8",
    "finetune.reward.learning_rate=0.005",
    "finetune.reward.max_length=128",
    "finetune.cpus_per_worker=1",
)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama plus its chat tokenizer, saved with save_pretrained."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-base"))


def write_jsonl(path: Path, records: Iterable[Any]) -> Path:
    """Write records (dicts, or raw strings for malformed lines) as JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def rag_records(n: int) -> list[dict[str, Any]]:
    """RAG triples whose answer sits in the second passage."""
    cities = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid")]
    out = []
    for i in range(n):
        country, city = cities[i % len(cities)]
        out.append(
            {
                "question": f"What is the capital of {country}?",
                "answer": f"The capital of {country} is {city}.",
                "contexts": [
                    "Qdrant stores vectors and Ray Data embeds documents.",
                    f"Geography notes: the capital of {country} is {city}, a large city.",
                ],
            }
        )
    return out


def preference_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Synthetic preferences: the chosen answer cites a passage and names Paris; the rejected one does not."""
    rng = random.Random(seed)
    topics = ["GPU", "storage", "cluster", "queue", "vector", "passage", "index", "model"]
    out = []
    for i in range(n):
        t = rng.choice(topics)
        out.append(
            {
                "prompt": f"Question {i} about the {t}?",
                "chosen": f"The {t} answer is in the passage, Paris [1].",
                "rejected": f"The {t} answer is unknown, Berlin.",
            }
        )
    return out


@pytest.fixture
def sft_file(tmp_path: Path) -> Path:
    """24 RAG triples plus one two-turn chat."""
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "goodbye"},
        ]
    }
    return write_jsonl(tmp_path / "data" / "sft.jsonl", [*rag_records(24), chat])


@pytest.fixture
def ft_settings(tmp_path: Path, tiny_base: Path) -> Callable[..., Any]:
    """Settings on a fresh data dir training the tiny base; ``--set``-style overrides apply."""
    from ragops.config import load_settings

    def make(*overrides: str, data_dir: Path | None = None) -> Any:
        base = [f"finetune.base_model={tiny_base}", *FAST]
        return load_settings([], base + list(overrides), data_dir=data_dir or tmp_path / "home", environ={})

    return make


def metrics_by_step(rows: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """Training rows (with a loss) keyed by step."""
    return {int(r["step"]): dict(r) for r in rows if "loss" in r}


@pytest.fixture(scope="session")
def ppo_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with larger initial weights (``initializer_range=0.3``), for PPO.

    With the default 0.02 the frozen output layer keeps every token's probability near
    1/vocab whatever the adapter does, so no policy can learn; at 0.3 the logits spread enough
    for a LoRA adapter to move probability mass (the toy task's answers contain the target
    about 15% of the time before training).
    """
    return build_tiny_llama(tmp_path_factory.mktemp("ppo-base"), initializer_range=0.3)


#: PPO overrides for the tiny model (after FAST).
PPO_FAST = (
    "finetune.lora.r=8",
    "finetune.lora.alpha=16",
    "finetune.lora.target_modules=all-linear",
    "finetune.ppo.batch_size=8",
    "finetune.ppo.minibatch_size=4",
    "finetune.ppo.ppo_epochs=2",
    "finetune.ppo.max_new_tokens=8",
    "finetune.ppo.learning_rate=0.005",
    "finetune.ppo.save_steps=2",
)


def ppo_prompt_records(n: int) -> list[dict[str, Any]]:
    """RAG prompts over two passages (the answer sits in the second)."""
    return [{k: v for k, v in r.items() if k != "answer"} for r in rag_records(n)]
