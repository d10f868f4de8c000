"""End-to-end fine-tuning on a real local Ray (2 CPUs) with the tiny Llama.

One two-worker SFT run through the CLI, with a worker killed mid-run, is shared by the module
(the registry and runs tests use it); resuming an interrupted run gets its own runs. Reward-model learning runs in-process by
default and on Ray Train in the slow set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ragops.errors import ConfigError
from tests.finetune.conftest import (
    FAST,
    metrics_by_step,
    preference_records,
    rag_records,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("ray_local")


def cli() -> typer.Typer:
    """The three command groups as the CLI registers them."""
    from ragops.commands.models import models_app
    from ragops.commands.runs import runs_app
    from ragops.commands.train import train_app

    app = typer.Typer()
    app.add_typer(train_app, name="train")
    app.add_typer(models_app, name="models")
    app.add_typer(runs_app, name="runs")
    return app


def invoke(*args: str) -> Any:
    """Run a CLI command with --json and return its parsed stdout."""
    result = CliRunner().invoke(cli(), [*args, "--json"])
    assert result.exit_code == 0, f"{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Any]:
    """`ragops train sft --workers 2` through the CLI, with worker 1 killed once after step 3.

    The chaos drill (RAGOPS_TRAIN_FAULT) makes the worker os._exit() once, after the step-2
    checkpoint is persisted; FailureConfig(max_failures=1) restarts the worker group.
    """
    root = tmp_path_factory.mktemp("sft2")
    data = write_jsonl(root / "sft.jsonl", rag_records(16))
    sets = [f"--set={s}" for s in (f"finetune.base_model={tiny_base}", *FAST, "finetune.sft.eval_steps=2", "finetune.max_failures=1")]
    marker = root / "killed"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGOPS_TRAIN_FAULT", f"step=3,rank=1,marker={marker}")
        summary = invoke(
            "train", "sft", "--data", str(data), "--workers", "2", "--max-steps", "6", "--tag", "exp=a", "--tag",
            "lr=high", "--data-dir", str(root / "home"), *sets,
        )  # fmt: skip
    return {"home": root / "home", "summary": summary, "data": data, "marker": marker}


def test_two_ray_workers_survive_a_killed_worker(two_worker_run: dict[str, Any]) -> None:
    s, home = two_worker_run["summary"], two_worker_run["home"]
    assert two_worker_run["marker"].is_file(), "worker 1 was killed after step 3"
    assert s["status"] == "finished" and s["kind"] == "sft" and s["restarts"] >= 1
    m = s["metrics"]
    assert m["resumed_from_step"] == 2, "the restarted worker group resumed from the step-2 checkpoint"
    assert s["steps"] == s["planned_steps"] == m["global_step"] == 6, "the planned number of optimizer steps"
    assert m["world_size"] == 2 and m["eval_loss"] > 0
    assert s["artifact"] == s["run_id"] and s["aliases"] == ["sft-latest"]
    assert s["data"]["train_examples"] + s["data"]["eval_examples"] == 16
    run_dir = home / "runs" / s["run_id"]
    assert list(run_dir.glob("checkpoint_*")), "Ray Train persisted checkpoints into the run folder"
    shown = invoke("runs", "show", s["run_id"], "--data-dir", str(home))
    assert shown["run"]["restarts"] >= 1
    steps = metrics_by_step(shown["metrics"])
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and "learning_rate" in r for r in steps.values())
    assert all(steps[k]["tokens_per_s"] > 0 and steps[k]["step_time_s"] > 0 for k in (2, 5, 6))
    assert any("eval_loss" in r for r in shown["metrics"])
    assert (run_dir / "metrics.parquet").is_file()
    assert [r["run_id"] for r in invoke("runs", "list", "--tag", "exp=a", "--data-dir", str(home))["runs"]] == [s["run_id"]]
    assert invoke("runs", "list", "--tag", "exp=a", "--tag", "lr=low", "--data-dir", str(home))["runs"] == []


def test_registry_round_trip(two_worker_run: dict[str, Any], tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train → list → promote → generate with the alias → train again → gate → rollback."""
    from ragops.finetune.train import train
    from ragops.retrieval.generation import Generator

    from ragops.config import GeneratorConfig, load_settings

    home, first = two_worker_run["home"], two_worker_run["summary"]["artifact"]
    listed = invoke("models", "list", "--data-dir", str(home))
    assert "smollm2-135m-instruct" in {m["name"] for m in listed["models"]}
    (art,) = listed["artifacts"]
    assert art["name"] == first and art["aliases"] == ["sft-latest"] and art["base_model"] == str(tiny_base)
    assert invoke("models", "promote", first, "--alias", "prod", "--data-dir", str(home))["previous"] is None
    shown = invoke("models", "show", "prod", "--data-dir", str(home))
    assert shown["name"] == first and shown["aliases"] == ["prod", "sft-latest"] and "adapter_model.safetensors" in shown["files"]

    # Generation loads the adapter by alias through resolve_adapter (the registry of RAGOPS_HOME).
    monkeypatch.setenv("RAGOPS_HOME", str(home))
    gen = Generator(GeneratorConfig(model=str(tiny_base), adapter="prod", max_new_tokens=6))
    result = gen.generate([{"role": "user", "content": "What is the capital of France?"}])
    assert result.completion_tokens > 0 and result.text

    # A second, in-process run publishes a newer sft-latest on the same data.
    settings = load_settings([], [f"finetune.base_model={tiny_base}", *FAST, "finetune.runner=local"], data_dir=home, environ={})
    second = train(settings, "sft", two_worker_run["data"], max_steps=2, tags={"exp": "b"})
    assert second.artifact.name != first and second.aliases == ["sft-latest"]
    assert invoke("runs", "compare", first, second.run.run_id, "--data-dir", str(home))["runs"] == [first, second.run.run_id]

    # The gate compares the recorded metric with prod's; record an eval that makes it worse.
    from ragops.artifacts import Registry, record_eval

    registry = Registry.from_settings(settings)
    record_eval(first, {"answer_f1": 0.5}, registry=registry)
    record_eval(second.artifact.name, {"answer_f1": 0.2}, registry=registry)
    refused = CliRunner().invoke(cli(), ["models", "promote", second.artifact.name, "--alias", "prod", "--require-metric",
                                         "answer_f1", "--data-dir", str(home)])  # fmt: skip
    assert refused.exit_code != 0 and "refused" in refused.stderr
    record_eval(second.artifact.name, {"answer_f1": 0.6}, registry=registry)
    promoted = invoke("models", "promote", second.artifact.name, "--alias", "prod", "--require-metric", "answer_f1", "--data-dir", str(home))
    assert promoted["previous"] == first and promoted["gate"]["passed"]
    rolled = invoke("models", "rollback", "prod", "--data-dir", str(home))
    assert rolled == {"alias": "prod", "target": first, "previous": second.artifact.name}
    assert registry.resolve("prod") == first


def test_resume_an_interrupted_run(tmp_path: Path, sft_file: Path, ft_settings: Callable[..., Any]) -> None:
    from ragops.finetune.train import TrainingFailed, train

    from ragops.runs import RunStore

    settings = ft_settings("finetune.max_failures=0")
    with pytest.raises(TrainingFailed, match="--resume auto"):
        train(settings, "sft", sft_file, workers=1, max_steps=6, fault={"step": 3, "marker": str(tmp_path / "k")})
    (failed,) = RunStore.from_settings(settings).list()
    assert failed.status == "failed" and failed.last_checkpoint
    resumed = train(settings, "sft", sft_file, workers=1, max_steps=6, resume="auto", tags={"note": "resumed"})
    assert resumed.resumed and resumed.run.run_id == failed.run_id and resumed.run.attempts == 2
    assert resumed.run.metrics["resumed_from_step"] == 2
    assert resumed.run.step == resumed.run.planned_steps == 6
    assert resumed.run.tags == {"note": "resumed"}
    # Nothing left to resume: a fresh run.
    again = train(settings.model_copy(update={"finetune": settings.finetune.model_copy(update={"runner": "local"})}),
                  "sft", sft_file, max_steps=1, resume="auto")  # fmt: skip
    assert not again.resumed and again.run.run_id != failed.run_id


def test_resume_from_a_checkpoint_folder_in_process(sft_file: Path, ft_settings: Callable[..., Any]) -> None:
    from ragops.finetune.train import train

    settings = ft_settings("finetune.runner=local")
    first = train(settings, "sft", sft_file, max_steps=2)
    ckpt = min((settings.data_dir / "runs" / first.run.run_id).glob("checkpoint_*/checkpoint"))
    second = train(settings, "sft", sft_file, max_steps=4, resume=str(ckpt.parent))
    assert not second.resumed and second.run.run_id != first.run.run_id
    assert second.run.metrics["resumed_from_step"] == 2 and second.run.step == 4


def test_reward_model_beats_chance_in_process(tmp_path: Path, ft_settings: Callable[..., Any]) -> None:
    from ragops.finetune.reward import RewardScorer
    from ragops.finetune.train import train

    from ragops.artifacts import Registry

    data = write_jsonl(tmp_path / "pref.jsonl", preference_records(64))
    settings = ft_settings("finetune.runner=local", "finetune.reward.eval_fraction=0.25", "finetune.lora.r=8")
    result = train(settings, "reward", data, max_steps=30)
    m = result.run.metrics
    assert m["eval_pairwise_accuracy"] >= 0.9, m  # chance is 0.5
    assert m["eval_pairwise_accuracy"] > m["initial_eval_pairwise_accuracy"]
    assert set(result.aliases) == {"reward-latest", "rm-latest"} and result.artifact.task == "seq-cls"
    registry = Registry.from_settings(settings)
    scorer = RewardScorer(registry.local_dir("rm-latest"), registry.get("rm-latest").base_model)
    held = preference_records(70, seed=0)[64:]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in held]
    good, bad = scorer.score(prompts, [r["chosen"] for r in held]), scorer.score(prompts, [r["rejected"] for r in held])
    assert sum(g > b for g, b in zip(good, bad)) >= 5


@pytest.mark.slow
def test_reward_model_on_two_ray_workers(tmp_path: Path, ft_settings: Callable[..., Any]) -> None:
    from ragops.finetune.train import train

    data = write_jsonl(tmp_path / "pref.jsonl", preference_records(64))
    settings = ft_settings("finetune.reward.eval_fraction=0.25", "finetune.lora.r=8")
    result = train(settings, "reward", data, workers=2, max_steps=20)
    assert result.run.metrics["world_size"] == 2
    assert result.run.metrics["eval_pairwise_accuracy"] > 0.5


def test_qlora_is_refused_without_a_gpu(sft_file: Path, ft_settings: Callable[..., Any]) -> None:
    from ragops.finetune.train import train

    with pytest.raises(ConfigError, match="QLoRA.*GPU"):
        train(ft_settings("finetune.lora.quantization=4bit"), "sft", sft_file)


def test_a_training_that_stops_stepping_is_stopped_by_the_watchdog(tmp_path: Path, sft_file: Path, ft_settings: Callable[..., Any]) -> None:
    from ragops.finetune.train import train
    from ragops.runs import RunStore
    from ragops.watchdog import Stalled

    settings = ft_settings("finetune.max_failures=0", "runtime.stall_timeout_s=30")
    with pytest.raises(Stalled) as exc:  # the worker hangs after step 2: no metrics row comes any more
        train(settings, "sft", sft_file, workers=1, max_steps=6, fault={"step": 2, "marker": str(tmp_path / "h"), "hang": True})
    assert str(exc.value).startswith("train sft made no progress for") and "last step 1" in str(exc.value)  # step 2 hangs before its row
    (run,) = RunStore.from_settings(settings).list()
    assert run.status == "failed" and run.error.startswith("stalled: train sft made no progress")
