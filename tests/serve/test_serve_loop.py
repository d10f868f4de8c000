"""The closed loop end to end on the running app: chats, feedback, reward model, PPO, gate, canary, report, decide.

Everything real: the Serve app of ``conftest`` (tiny models), an SFT control trained here, the
chat endpoint's own request log and feedback, Ray-free local trainers (``finetune.runner=local``)
so the loop's steps run in this process, and the evaluation through the server (it holds the
embedded index). A second test kills ``ragops loop`` (SIGKILL) in the middle of PPO and starts
it again: the loop continues that PPO run and repeats no finished step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.finetune.conftest import FAST, rag_records, write_jsonl
from tests.serve.conftest import Served, chat_body

pytestmark = pytest.mark.e2e

LOOP_FAST = (
    *FAST,
    "finetune.runner=local",
    "finetune.sft.max_steps=2",
    "finetune.reward.max_steps=2",
    "finetune.reward.max_length=512",  # a feedback prompt holds its passages
    "finetune.ppo.batch_size=4",
    "finetune.ppo.minibatch_size=2",
    "finetune.ppo.ppo_epochs=1",
    "finetune.ppo.max_new_tokens=4",
    "finetune.ppo.save_steps=1",
    "loop.ppo_max_steps=2",
    "loop.min_pairs=2",
    "loop.gate_tolerance=1.0",  # random tiny models: the gate must let the candidate through
    "loop.canary=0.5",
    "loop.ab.min_effect=0.5",  # 26 ratings per variant
)


def _overrides(served: Served, tiny_llm_dir: Path, eval_file: Path, *extra: str) -> list[str]:
    return [f"generator.model={tiny_llm_dir}", f"embedder.model={served.settings.embedder.model}", *LOOP_FAST,
            f"loop.eval_data={eval_file}", f"loop.server_url={served.url}", *extra]  # fmt: skip


def _settings(served: Served, tiny_llm_dir: Path, eval_file: Path, *extra: str) -> Any:
    from ragops.config import load_settings

    return load_settings([], _overrides(served, tiny_llm_dir, eval_file, *extra), data_dir=served.settings.data_dir, environ={})


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import SAMPLE_DOCS

    rows = [json.loads(x) for x in (SAMPLE_DOCS.parent / "eval" / "answers.jsonl").read_text().splitlines() if x.strip()]
    return write_jsonl(tmp_path_factory.mktemp("loop-eval") / "answers.jsonl", rows[:3])


def _control(settings: Any, alias: str, tmp_path: Path) -> str:
    """An SFT adapter on the served base model, behind ``alias`` (the loop's control)."""
    from ragops.artifacts import Registry
    from ragops.finetune.train import train

    result = train(settings, "sft", [write_jsonl(tmp_path / "sft.jsonl", rag_records(8))], max_steps=2)
    Registry.from_settings(settings).set_alias(alias, result.artifact.name)
    return result.artifact.name


def _chat_and_rate(api: httpx.Client, model: str, n: int, rate: Any, prefix: str) -> list[str]:
    """``n`` chats from different users; ``rate(variant, i)`` → (rating, preferred answer | None)."""
    variants = []
    for i in range(n):
        r = api.post("/v1/chat/completions", json=chat_body(f"What is MIG? ({prefix} {i})", model=model, max_tokens=3,
                                                            user=f"{prefix}-{i}", rag={"k": 1}))  # fmt: skip
        assert r.status_code == 200, r.text
        variant = r.headers["x-ragops-variant"]
        rating, preferred = rate(variant, i)
        fb = api.post("/v1/feedback", json={"request_id": r.json()["id"], "rating": rating,
                                            **({"preferred_answer": preferred} if preferred else {})})  # fmt: skip
        assert fb.status_code == 200, fb.text
        variants.append(variant)
    return variants


def _cli(*args: str) -> Any:
    from ragops.cli import app

    res = CliRunner().invoke(app, list(args), env={"RAGOPS_API_KEY": "test-chat-key-0123456789"})
    return res


def test_the_whole_loop_through_the_endpoint(served: Served, api: httpx.Client, tiny_llm_dir: Path, eval_file: Path,
                                             tmp_path: Path) -> None:  # fmt: skip
    from ragops.artifacts import Registry
    from ragops.llmops.abtest import ratings_needed
    from ragops.serve.models import ALIAS_TTL_S

    alias = "loopprod"
    settings = _settings(served, tiny_llm_dir, eval_file)
    sets = [f"--set={s}" for s in _overrides(served, tiny_llm_dir, eval_file)]
    common = ["--data-dir", str(served.settings.data_dir), *sets]
    # No feedback on the alias yet: one clear error, nothing written.
    registry = Registry.from_settings(settings)
    control = _control(settings, alias, tmp_path)
    before = {p.name for p in (Path(served.settings.data_dir) / "registry").rglob("*")}

    # Real traffic on the alias: answers rated down with a better answer (preference pairs) or up.
    _chat_and_rate(api, alias, 10, lambda v, i: ("down", f"MIG splits a GPU into isolated slices [{i % 2 + 1}].")
                   if i % 2 else ("up", None), "fb")  # fmt: skip

    res = _cli("loop", alias, *common, "--json")
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["status"] == "canary" and rec["control"] == control
    assert [s for s in ("collect", "reward", "ppo", "eval", "gate", "canary") if rec["steps"][s]["status"] == "done"] == \
        ["collect", "reward", "ppo", "eval", "gate", "canary"]  # fmt: skip
    candidate = rec["candidate"]
    assert rec["steps"]["ppo"]["reward"] == rec["steps"]["reward"]["artifact"]  # PPO against the new reward model
    assert registry.get(candidate).parent == control or registry.get(candidate).kind == "ppo"
    assert registry.get(candidate).metrics.get("answer_f1") is not None  # evaluated and recorded
    assert registry.resolve(f"{alias}-candidate") == candidate
    assert rec["steps"]["canary"]["weights"] == {control: 0.5, candidate: 0.5}
    # A canary is running: starting another loop is refused.
    again = _cli("loop", alias, *common)
    assert again.exit_code != 0 and "--decide" in again.output

    time.sleep(ALIAS_TTL_S + 0.5)  # every ingress replica re-reads the stored split within ALIAS_TTL_S
    need = ratings_needed(0.5)
    # Users prefer the candidate: they rate its answers up, the control's down (a few control ups).
    prefer_b = lambda v, i: ("up", None) if v == candidate or i % 5 == 0 else ("down", None)  # noqa: E731
    seen = _chat_and_rate(api, alias, 20, prefer_b, "ab1")
    assert set(seen) == {control, candidate}
    waiting = _cli("loop", alias, "--decide", *common, "--json")
    assert waiting.exit_code == 0, waiting.output
    assert json.loads(waiting.stdout)["status"] == "canary"
    assert json.loads(waiting.stdout)["decision"]["verdict"] == "not enough data"

    report = _cli("ab", "report", alias, *common, "--json")
    assert report.exit_code == 0, report.output
    variants = {v["variant"]: v for v in json.loads(report.stdout)["variants"]}
    assert set(variants) == {control, candidate} and variants[candidate]["up_rate"] == 1.0
    more = max(json.loads(report.stdout)["comparisons"][0]["more_needed"].values())
    i = 0
    while min(variants[v]["ratings"] for v in variants) < need:
        _chat_and_rate(api, alias, max(8, more), prefer_b, f"ab2-{i}")
        variants = {v["variant"]: v for v in json.loads(_cli("ab", "report", alias, *common, "--json").stdout)["variants"]}
        i += 1
        assert i < 10, variants
    decided = _cli("loop", alias, "--decide", *common, "--json")
    assert decided.exit_code == 0, decided.output
    out = json.loads(decided.stdout)
    assert out["status"] == "promoted" and out["decision"]["verdict"] == "B better"
    assert registry.resolve(alias) == candidate
    time.sleep(ALIAS_TTL_S + 0.5)
    r = api.post("/v1/chat/completions", json=chat_body(model=alias, max_tokens=2, user="after"))
    assert r.status_code == 200 and r.headers["x-ragops-variant"] == candidate  # the split is gone: all on B
    assert before <= {p.name for p in (Path(served.settings.data_dir) / "registry").rglob("*")}


def test_a_loop_with_no_feedback_is_one_clear_error(served: Served, tiny_llm_dir: Path, eval_file: Path, tmp_path: Path) -> None:
    from ragops.artifacts import Registry

    quiet = tmp_path / "no-feedback"  # a feedback folder nobody rated into
    sets = [f"--set={s}" for s in _overrides(served, tiny_llm_dir, eval_file, f"serve.feedback_dir={quiet}")]
    settings = _settings(served, tiny_llm_dir, eval_file)
    registry = Registry.from_settings(settings)
    registry.set_alias("loopquiet", registry.names()[0]) if registry.names() else _control(settings, "loopquiet", tmp_path)
    aliases = registry.aliases()
    res = _cli("loop", "loopquiet", "--data-dir", str(served.settings.data_dir), *sets)
    assert res.exit_code != 0 and "0 feedback record(s) ever" in res.output, res.output
    assert not (Path(served.settings.data_dir) / "registry" / "loops" / "loopquiet").exists()
    unknown = _cli("loop", "no-such-alias", "--data-dir", str(served.settings.data_dir), *sets)
    assert unknown.exit_code != 0 and "no-such-alias" in unknown.output
    assert registry.aliases() == aliases  # nothing moved


def test_a_loop_killed_in_the_middle_of_ppo_continues_it(served: Served, api: httpx.Client, tiny_llm_dir: Path,
                                                         eval_file: Path, tmp_path: Path) -> None:  # fmt: skip
    """SIGKILL `ragops loop` once PPO has a checkpoint; the next `ragops loop` resumes that PPO run."""
    from ragops.artifacts import Registry
    from ragops.llmops.loop_state import LoopStore

    alias = "loopkill"
    extra = ("loop.ppo_max_steps=6", "finetune.ppo.save_steps=1")
    settings = _settings(served, tiny_llm_dir, eval_file, *extra)
    registry = Registry.from_settings(settings)
    control = _control(settings, alias, tmp_path)
    _chat_and_rate(api, alias, 6, lambda v, i: ("down", f"MIG partitions a GPU [{i % 2 + 1}].") if i % 2 else ("up", None), "kill")
    sets = [f"--set={s}" for s in _overrides(served, tiny_llm_dir, eval_file, *extra)]
    cmd = [str(Path(sys.executable).parent / "ragops"), "loop", alias, "--data-dir", str(served.settings.data_dir), *sets]
    env = {**os.environ, "RAGOPS_API_KEY": served.chat_key}
    store, runs = LoopStore(registry.storage), Path(served.settings.data_dir) / "runs"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    killed_run = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            rec = store.latest(alias)
            run_id = rec.steps.get("ppo", {}).get("run_id") if rec else None
            if run_id and any((runs / run_id).glob("checkpoint_*")):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: no cleanup runs
                killed_run = run_id
                break
            time.sleep(0.2)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed_run, f"PPO never checkpointed before the loop ended: {proc.stderr.read().decode()[-2000:]}"
    rec = store.latest(alias)
    assert rec.status == "running" and rec.steps["ppo"]["status"] == "running"
    reward_run = rec.steps["reward"]["run_id"]
    assert rec.steps["reward"]["status"] == "done"

    res = _cli("loop", alias, "--data-dir", str(served.settings.data_dir), *sets, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["id"] == rec.id and out["status"] == "canary" and out["control"] == control
    assert out["steps"]["ppo"]["run_id"] == killed_run  # the same PPO run, continued
    assert out["steps"]["reward"]["run_id"] == reward_run  # the finished reward step was not repeated
    assert len(list(runs.glob("reward-*"))) == len({p.name for p in runs.glob("reward-*")})
    from ragops.runs import RunStore

    ppo_run = RunStore.from_settings(settings).get(killed_run)
    assert ppo_run.status == "finished" and ppo_run.step == 6
    _cli("serve", "split", alias, "--clear", "--offline", "--data-dir", str(served.settings.data_dir), *sets)
