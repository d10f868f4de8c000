"""PPO with the tiny Llama: rollouts, learning a toy task, Ray Train with a killed worker, resume,
rewards from the registry, prompts, the CLI and generation with ``ppo-latest``.

The two-worker Ray run with a worker killed mid-run (through the CLI) is compared step by step
with the same run uninterrupted: FailureConfig restarts the group from the step-2 checkpoint
and, because every step's sampling is seeded from (seed, step, rank) and the checkpoint holds
the adapter, value head, AdamW state and KL controller, the metrics of steps 3-4 match.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ragops.errors import ConfigError, InputError
from tests.finetune.conftest import (
    FAST,
    PPO_FAST,
    ppo_prompt_records,
    preference_records,
    write_jsonl,
)
from tests.finetune.test_train import cli, invoke

TOY_REWARD = "tests.finetune.ppo_toys:ContainsTarget"
#: Metrics that must be identical between an interrupted-and-restarted run and an uninterrupted one.
COMPARED = ("reward", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "approx_kl", "response_len")


@pytest.fixture
def ppo_settings(tmp_path: Path, ppo_base: Path) -> Callable[..., Any]:
    from ragops.config import load_settings

    def make(*overrides: str, data_dir: Path | None = None) -> Any:
        base = [f"finetune.base_model={ppo_base}", *FAST, *PPO_FAST]
        return load_settings([], base + list(overrides), data_dir=data_dir or tmp_path / "home", environ={})

    return make


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", ppo_prompt_records(8))


def steps_of(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(r["step"]): r for r in rows if "reward" in r}


# ---------------------------------------------------------------------------------------
# Rollouts and the reference
# ---------------------------------------------------------------------------------------


def test_rollout_logprobs_match_generation_and_reference_is_the_base(ppo_base: Path) -> None:
    """Log-probs of the PPO forward equal those generate() sampled with; disable_adapter() is the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from ragops.finetune.ppo import (
        PolicyValue,
        encode_prompts,
        eos_ids,
        response_logits,
        sample_rollout,
    )
    from ragops.finetune.ppo_math import logprobs_from_logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ppo_base)
    plain = AutoModelForCausalLM.from_pretrained(ppo_base).eval()
    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(ppo_base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    module = PolicyValue(policy).eval()
    ids = encode_prompts(tok, [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "Tell me about topic 3 now."}]], 100)
    eos = eos_ids(tok, policy)
    batch = sample_rollout(policy, ids, pad_id=tok.pad_token_id, eos=eos, max_new_tokens=10, temperature=0.7, top_k=0, seed=1)
    assert batch.input_ids.shape[0] == 2 and batch.mask.shape == batch.response.shape
    with torch.no_grad():
        logits, values = module(batch.input_ids, batch.attention_mask, batch.position_ids, batch.n)
        logp = logprobs_from_logits(logits / 0.7, batch.response)
        assert values.shape == batch.response.shape and float(values.abs().max()) == 0.0  # zero-initialised head

        # The same sampling through generate() with its logits: identical tokens and log-probs.
        width = max(len(p) for p in ids)
        torch.manual_seed(1)
        gen = policy.generate(
            input_ids=batch.input_ids[:, :width], attention_mask=batch.attention_mask[:, :width], do_sample=True,
            temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=10, pad_token_id=tok.pad_token_id,
            eos_token_id=sorted(eos), output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        sampled = gen.sequences[:, width:]
        assert torch.equal(sampled * batch.mask.long(), batch.response * batch.mask.long())
        gen_logp = logprobs_from_logits(torch.stack(gen.logits, 1) / 0.7, sampled)
        assert float(((gen_logp - logp) * batch.mask).abs().max()) < 1e-4

        # Reference = the adapter switched off = the plain base model (no second copy needed).
        with policy.disable_adapter():
            ref = response_logits(policy, batch, batch.n)
        base = response_logits(plain, batch, batch.n)
        assert float((ref - base).abs().max()) < 1e-5
        assert float((ref - logits).abs().max()) > 1e-3  # the (non-zero) adapter changes the policy


def test_step_prompts_cover_the_list_and_depend_only_on_step_and_rank() -> None:
    from ragops.finetune.ppo import step_prompts

    seen = [i for step in (1, 2) for rank in (0, 1) for i in step_prompts(10, step, rank, 3, 2, seed=0)][:10]
    assert sorted(seen) == list(range(10))  # the first pass is a permutation
    assert step_prompts(10, 5, 1, 3, 2, 0) == step_prompts(10, 5, 1, 3, 2, 0)
    assert step_prompts(10, 1, 0, 3, 2, 0) != step_prompts(10, 1, 0, 3, 2, 1)


# ---------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------


def test_toy_task_reward_rises(tmp_path: Path, ppo_settings: Callable[..., Any]) -> None:
    """Reward = 1 when the answer contains the target: the mean reward climbs within 20 steps (fixed seed)."""
    from ragops.finetune.ppo_train import train_ppo

    prompts = write_jsonl(tmp_path / "toy.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(16)])
    settings = ppo_settings(
        "finetune.runner=local", "finetune.ppo.batch_size=32", "finetune.ppo.minibatch_size=16", "finetune.ppo.ppo_epochs=4",
        "finetune.ppo.kl.mode=fixed", "finetune.ppo.kl.init_coef=0.01", "finetune.ppo.target_approx_kl=1.0",
        "finetune.ppo.save_steps=100",
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    result = train_ppo(settings, prompts, reward=TOY_REWARD, max_steps=20, progress=rows.append)
    steps = steps_of(rows)
    assert sorted(steps) == list(range(1, 21))
    rewards = [steps[s]["reward"] for s in range(1, 21)]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert first < 0.35, rewards  # about 15% of random answers contain the target
    assert last > 0.7 and last > first + 0.4, rewards
    # The policy moved away from the reference to get there, and the run recorded it.
    assert steps[20]["kl"] > steps[1]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["entropy"] > 0 and r["tokens_per_s"] > 0 and r["kl_coef"] == pytest.approx(0.01) for r in steps.values())
    m = result.run.metrics
    assert m["final_reward"] > m["initial_reward"] and result.aliases == ["ppo-latest"]
    assert result.artifact.kind == "ppo" and "value_head.safetensors" in result.artifact.files


# ---------------------------------------------------------------------------------------
# Ray Train: two workers, a killed worker, exact continuation
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_ray_runs(tmp_path_factory: pytest.TempPathFactory, ppo_base: Path, ray_local: None) -> dict[str, Any]:
    """The same 4-step, 2-worker PPO run twice: uninterrupted, and through the CLI with worker 1
    killed after step 3 (the step-2 checkpoint is persisted first; FailureConfig restarts the group)."""
    from ragops.finetune.ppo_train import train_ppo

    from ragops.config import load_settings

    root = tmp_path_factory.mktemp("ppo2")
    prompts = write_jsonl(root / "prompts.jsonl", ppo_prompt_records(8))
    sets = [f"finetune.base_model={ppo_base}", *FAST, *PPO_FAST, "finetune.max_failures=1", "finetune.ppo.batch_size=4",
            "finetune.ppo.minibatch_size=2"]  # fmt: skip
    plain_settings = load_settings([], sets, data_dir=root / "plain", environ={})
    plain = train_ppo(plain_settings, prompts, workers=2, max_steps=4, reward="rag")
    from ragops.runs import RunStore

    plain_rows = RunStore.from_settings(plain_settings).metrics(plain.run.run_id)
    marker = root / "killed"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGOPS_TRAIN_FAULT", f"step=3,rank=1,marker={marker}")
        summary = invoke(
            "train", "ppo", "--prompts", str(prompts), "--reward", "rag", "--workers", "2", "--max-steps", "4",
            "--tag", "exp=ppo", "--data-dir", str(root / "home"), *[f"--set={s}" for s in sets],
        )  # fmt: skip
    return {"home": root / "home", "summary": summary, "marker": marker, "plain": plain, "plain_rows": plain_rows}


def test_killed_worker_continues_exactly(ppo_ray_runs: dict[str, Any]) -> None:
    s, home = ppo_ray_runs["summary"], ppo_ray_runs["home"]
    assert ppo_ray_runs["marker"].is_file(), "worker 1 was killed after step 3"
    assert s["status"] == "finished" and s["kind"] == "ppo" and s["restarts"] >= 1
    m = s["metrics"]
    assert m["resumed_from_step"] == 2 and m["world_size"] == 2
    assert s["steps"] == s["planned_steps"] == m["global_step"] == 4
    plain = ppo_ray_runs["plain"]
    assert plain.run.metrics["resumed_from_step"] == 0 and plain.run.step == 4
    shown = invoke("runs", "show", s["run_id"], "--data-dir", str(home))
    killed, uninterrupted = steps_of(shown["metrics"]), steps_of(ppo_ray_runs["plain_rows"])
    assert sorted(killed) == sorted(uninterrupted) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for key in COMPARED:
            assert killed[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert m["final_reward"] == pytest.approx(plain.run.metrics["final_reward"], rel=1e-4, abs=1e-6)
    # The rag reward is in [-1.5, 1.5]; KL starts at 0 (a fresh adapter is the identity).
    assert all(-1.5 <= r["reward"] <= 1.5 for r in killed.values()) and killed[1]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_ppo_run_in_runs_and_registry(ppo_ray_runs: dict[str, Any], ppo_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ragops.retrieval.generation import Generator

    from ragops.artifacts import Registry, apply_model
    from ragops.config import GeneratorConfig, load_settings

    s, home = ppo_ray_runs["summary"], ppo_ray_runs["home"]
    assert s["artifact"] == s["run_id"] and s["aliases"] == ["ppo-latest"]
    listed = invoke("runs", "list", "--tag", "exp=ppo", "--data-dir", str(home))["runs"]
    assert [r["run_id"] for r in listed] == [s["run_id"]]
    shown = CliRunner().invoke(cli(), ["runs", "show", s["run_id"], "--data-dir", str(home)])
    assert shown.exit_code == 0
    for header in ("reward", "kl", "entropy"):
        assert header in shown.stdout
    art = Registry(str(home / "registry")).get("ppo-latest")
    assert art.kind == "ppo" and art.base_model == str(ppo_base)
    lineage = art.config["lineage"]
    assert lineage["reward"] == {"name": "rag"} and lineage["init_adapter"] is None
    assert lineage["prompts_hash"] == art.data_hash == s["data"]["hash"] and art.code_version
    assert {"adapter_model.safetensors", "adapter_config.json", "value_head.safetensors"} <= set(art.files)

    # `ragops ask --model ppo-latest`: the generator loads the PPO adapter by alias.
    monkeypatch.setenv("RAGOPS_HOME", str(home))
    settings = apply_model(load_settings([], [f"generator.model={ppo_base}"], data_dir=home, environ={}), "ppo-latest")
    assert settings.generator.model == str(ppo_base)
    gen = Generator(GeneratorConfig(model=str(ppo_base), adapter="ppo-latest", max_new_tokens=6))
    result = gen.generate([{"role": "user", "content": "What is the capital of France?"}])
    assert result.completion_tokens > 0


@pytest.mark.slow
def test_resume_auto_continues_a_failed_run(tmp_path: Path, prompts_file: Path, ppo_settings: Callable[..., Any], ray_local: None) -> None:
    """A run that failed (no restarts allowed) continues with --resume auto and ends where an
    uninterrupted in-process run ends, with the same per-step metrics."""
    from ragops.finetune.ppo_train import train_ppo
    from ragops.finetune.train import TrainingFailed

    from ragops.runs import RunStore

    settings = ppo_settings("finetune.max_failures=0")
    with pytest.raises(TrainingFailed, match="--resume auto"):
        train_ppo(settings, prompts_file, reward="rag", max_steps=4, fault={"step": 3, "marker": str(tmp_path / "k")})
    store = RunStore.from_settings(settings)
    (failed,) = store.list()
    assert failed.status == "failed" and failed.last_checkpoint
    resumed = train_ppo(settings, prompts_file, reward="rag", max_steps=4, resume="auto")
    assert resumed.resumed and resumed.run.run_id == failed.run_id and resumed.run.attempts == 2
    assert resumed.run.metrics["resumed_from_step"] == 2 and resumed.run.step == 4

    local = ppo_settings("finetune.runner=local", data_dir=tmp_path / "local")
    plain = train_ppo(local, prompts_file, reward="rag", max_steps=4)
    a, b = steps_of(store.metrics(failed.run_id)), steps_of(RunStore.from_settings(local).metrics(plain.run.run_id))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for key in COMPARED:
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-6), (step, key)


# ---------------------------------------------------------------------------------------
# Rewards from the registry, init adapters, actors
# ---------------------------------------------------------------------------------------


def test_reward_model_mix_and_init_from_sft(tmp_path: Path, prompts_file: Path, ppo_settings: Callable[..., Any]) -> None:
    """rm-latest from `train reward`, mixed with rag; the policy starts from an SFT adapter."""
    from ragops.finetune.ppo_train import train_ppo
    from ragops.finetune.train import train

    from ragops.artifacts import Registry

    settings = ppo_settings(
        "finetune.runner=local", "finetune.ppo.reward.mix.rag=1.0", "finetune.ppo.reward.mix.rm-latest=0.5",
    )  # fmt: skip
    rm = train(settings, "reward", write_jsonl(tmp_path / "pref.jsonl", preference_records(16)), max_steps=2)
    sft = train(settings, "sft", write_jsonl(tmp_path / "sft.jsonl", [{**r, "answer": "Paris."} for r in ppo_prompt_records(4)]), max_steps=2)
    result = train_ppo(settings, prompts_file, reward="mix", init="sft-latest", max_steps=2)
    art = Registry.from_settings(settings).get(result.artifact.name)
    lineage = art.config["lineage"]
    assert lineage["init_adapter"] == sft.artifact.name and art.parent == sft.artifact.name
    parts = {p["name"]: p for p in lineage["reward"]["parts"]}
    assert parts["rm-latest"]["artifact"] == rm.artifact.name and parts["rm-latest"]["weight"] == 0.5
    assert parts["rag"]["weight"] == 1.0
    assert result.run.step == 2

    only_rm = train_ppo(settings, prompts_file, reward="rm-latest", max_steps=1)
    assert only_rm.run.step == 1
    with pytest.raises(InputError, match="is a ppo model, not a reward model"):
        train_ppo(settings, prompts_file, reward="ppo-latest", max_steps=1)
    with pytest.raises(InputError, match="reward model; start from an sft"):
        train_ppo(settings, prompts_file, init="rm-latest", max_steps=1)


@pytest.mark.slow
def test_rollout_actor_pool_samples_like_the_workers(tmp_path: Path, prompts_file: Path, ppo_settings: Callable[..., Any], ray_local: None) -> None:
    """rollout.where=actors: a separate Ray actor samples with the pushed adapter; same seeds, same run."""
    from ragops.finetune.ppo_train import train_ppo

    from ragops.runs import RunStore

    common = ("finetune.cpus_per_worker=1", "finetune.ppo.rollout.cpus_per_actor=0.5")
    on_workers = ppo_settings(*common, data_dir=tmp_path / "w")
    on_actors = ppo_settings(*common, "finetune.ppo.rollout.where=actors", data_dir=tmp_path / "a")
    a = train_ppo(on_workers, prompts_file, reward="rag", max_steps=3)
    b = train_ppo(on_actors, prompts_file, reward="rag", max_steps=3)
    ra = steps_of(RunStore.from_settings(on_workers).metrics(a.run.run_id))
    rb = steps_of(RunStore.from_settings(on_actors).metrics(b.run.run_id))
    for step in (1, 2, 3):
        for key in COMPARED:
            assert ra[step][key] == pytest.approx(rb[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_actors_need_ray(prompts_file: Path, ppo_settings: Callable[..., Any]) -> None:
    from ragops.finetune.ppo_train import train_ppo

    with pytest.raises(ConfigError, match="needs Ray"):
        train_ppo(ppo_settings("finetune.runner=local", "finetune.ppo.rollout.where=actors"), prompts_file, max_steps=1)


# ---------------------------------------------------------------------------------------
# Prompts and CLI errors
# ---------------------------------------------------------------------------------------


def test_prompt_records_and_feedback(tmp_path: Path, ppo_settings: Callable[..., Any]) -> None:
    from ragops.finetune.prompts import build_ppo_prompts

    settings = ppo_settings()
    mixed = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Say hi."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]},
        {"question": "What is the capital of France?", "contexts": ["Qdrant stores vectors.", {"text": "Paris is the capital.", "title": "Geo"}]},
    ])  # fmt: skip
    built = build_ppo_prompts(mixed, settings, runner="local")
    plain, chat, rag = built.examples
    assert plain == {"prompt": [{"role": "user", "content": "Say hi."}], "question": "Say hi.", "passages": []}
    assert chat["prompt"][0]["role"] == "system" and chat["question"] == "Why?"
    assert [p["n"] for p in rag["passages"]] == [1, 2] and rag["passages"][1]["title"] == "Geo"
    assert "[2]" in rag["prompt"][-1]["content"] and rag["prompt"][-1]["content"].rstrip().endswith("France?")
    assert built.extra == {"prompts": 3, "with_passages": 1}

    # `--prompts feedback`: the chat endpoint's records; a question rated twice is one prompt.
    fb = {"request_id": "r1", "question": "What is Ray?", "passages": [{"n": 1, "text": "Ray is a framework."}],
          "answer": "A framework [1].", "rating": "up"}  # fmt: skip
    write_jsonl(settings.data_dir / "feedback" / "feedback.jsonl", [fb, {**fb, "request_id": "r2", "rating": "down"}])
    built = build_ppo_prompts("feedback", settings, runner="local")
    (only,) = built.examples
    assert only["question"] == "What is Ray?" and only["passages"][0]["text"] == "Ray is a framework."


def test_prompt_errors(tmp_path: Path, ppo_settings: Callable[..., Any]) -> None:
    from ragops.finetune.prompts import build_ppo_prompts

    settings = ppo_settings()
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "ok"}', "{oops", '{"answer": "x"}', '{"prompt": ""}',
                                               '{"question": "q", "contexts": "not a list"}'])  # fmt: skip
    with pytest.raises(InputError) as info:
        build_ppo_prompts(bad, settings, runner="local")
    text = str(info.value)
    assert "4 malformed prompt record(s)" in text
    for where in (f"{bad}:2: not valid JSON", f"{bad}:3: expected 'prompt'", f"{bad}:4: 'prompt' must be a non-empty", f"{bad}:5: 'contexts'"):
        assert where in text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="hold no records"):
        build_ppo_prompts(empty, settings, runner="local")
    with pytest.raises(InputError, match="no feedback yet"):
        build_ppo_prompts("feedback", settings, runner="local")


def test_cli_errors_are_one_readable_message(tmp_path: Path, ppo_base: Path, prompts_file: Path) -> None:
    home = ["--data-dir", str(tmp_path / "home"), "--set", f"finetune.base_model={ppo_base}", "--set", "finetune.data.runner=local"]
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli(), ["train", "ppo", *args, *home])
        return result.exit_code, " ".join(result.stderr.split())

    code, msg = run("--prompts", str(write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "ok"}', "{oops"])))
    assert code == 2 and f"{tmp_path / 'bad.jsonl'}:2: not valid JSON" in msg and "Traceback" not in msg
    code, msg = run("--prompts", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "not found" in msg
    code, msg = run("--prompts", str(prompts_file), "--reward", "nope")
    assert code == 2 and "unknown reward 'nope'" in msg and "Traceback" not in msg
    code, msg = run("--prompts", str(prompts_file), "--reward", "no.such.module:Thing")
    assert code == 2 and "cannot import" in msg
    code, msg = run("--prompts", str(write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "hi"}])), "--reward", "rag")
    assert code == 2 and "no prompt has any" in msg
    code, msg = run("--prompts", str(prompts_file), "--init", "sft-latest")
    assert code == 2 and "--init sft-latest" in msg
    helped = runner.invoke(cli(), ["train", "ppo", "--help"])
    for flag in ("--prompts", "--base", "--init", "--reward", "--workers", "--gpu", "--max-steps", "--resume", "--tag", "--config", "--set", "--json"):
        assert flag in helped.stdout


def test_ppo_cli_in_process_json_summary(tmp_path: Path, ppo_base: Path, prompts_file: Path) -> None:
    sets = [f"--set={s}" for s in (f"finetune.base_model={ppo_base}", *FAST, *PPO_FAST, "finetune.runner=local")]
    summary = invoke("train", "ppo", "--prompts", str(prompts_file), "--max-steps", "2", "--tag", "k=v",
                     "--data-dir", str(tmp_path / "home"), *sets)  # fmt: skip
    assert summary["kind"] == "ppo" and summary["steps"] == 2 and summary["aliases"] == ["ppo-latest"]
    assert summary["tags"] == {"k": "v"} and {"initial_reward", "final_reward", "final_kl", "kl_coef"} <= set(summary["metrics"])
