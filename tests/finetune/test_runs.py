"""Run records (ragops.runs): create, tags, metrics de-duplication, resumable lookup, compare."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ragops.errors import InputError
from ragops.runs import RunStore


def test_records_tags_and_lookup(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs")
    a = store.create("sft", tags={"exp": "a", "team": "x"}, data={"hash": "h1"})
    b = store.create("sft", tags={"exp": "b"}, data={"hash": "h1"})
    r = store.create("reward", tags={"exp": "a"}, data={"hash": "h2"})
    assert [x.run_id for x in store.list(tags={"exp": "a"})] == [a.run_id, r.run_id]
    assert [x.run_id for x in store.list(kind="sft", tags={"exp": "a", "team": "x"})] == [a.run_id]
    assert store.list(tags={"exp": "zzz"}) == []
    assert store.get(a.run_id).tags == {"exp": "a", "team": "x"}
    store.update(b.run_id, artifact="art-1")
    assert store.get("art-1").run_id == b.run_id  # an artifact name finds its run
    with pytest.raises(InputError, match="no run"):
        store.get("nope")
    with pytest.raises(InputError, match="ambiguous"):
        store.get("sft-")


def test_metrics_keep_the_last_value_per_step(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs")
    rec = store.create("sft")
    store.append_metrics(rec.run_id, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}])
    # A worker group restarted from the step-1 checkpoint logs step 2 again.
    store.append_metrics(rec.run_id, [{"step": 2, "loss": 2.4}, {"step": 3, "loss": 2.0, "tokens_per_s": 100.0}])
    with open(tmp_path / "runs" / rec.run_id / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "lo')  # a torn last line
    rows = store.metrics(rec.run_id)
    assert [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows] == [
        (1, 3.0, None), (2, 2.4, None), (2, None, 2.7), (3, 2.0, None)
    ]  # fmt: skip
    location = store.write_parquet(rec.run_id)
    import pyarrow.parquet as pq

    table = pq.read_table(location)
    assert table.num_rows == 4 and "tokens_per_s" in table.column_names


def test_find_resumable(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs")
    done = store.create("sft", data={"hash": "h"})
    store.update(done.run_id, status="finished")
    failed = store.create("sft", data={"hash": "h"})
    store.update(failed.run_id, status="failed")
    assert store.find_resumable("sft", "h").run_id == failed.run_id
    assert store.find_resumable("sft", "other") is None
    assert store.find_resumable("reward", "h") is None
    live = store.create("sft", data={"hash": "h"})  # 'running' in this very process: not alive elsewhere
    assert store.find_resumable("sft", "h").run_id == live.run_id
    store.update(live.run_id, pid=os.getppid())  # 'running' and its driver is alive: not resumable
    assert store.find_resumable("sft", "h").run_id == failed.run_id


def test_compare(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs")
    a = store.create("sft", config={"sft": {"learning_rate": 0.1, "batch_size": 2}}, tags={"exp": "a"})
    b = store.create("sft", config={"sft": {"learning_rate": 0.2, "batch_size": 2}}, tags={"exp": "b"})
    store.update(a.run_id, metrics={"eval_loss": 2.0, "train_loss": 3.0})
    store.update(b.run_id, metrics={"eval_loss": 1.5})
    out = store.compare(a.run_id, b.run_id)
    rows = {r["key"]: r for r in out["rows"]}
    assert rows["eval_loss"]["delta"] == pytest.approx(-0.5) and rows["train_loss"]["b"] is None
    assert {d["key"] for d in out["config_diff"]} == {"sft.learning_rate", "tag.exp"}


def test_compare_three_runs_and_their_curves(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs")
    recs = [store.create("sft", config={"sft": {"learning_rate": lr}}) for lr in (0.1, 0.1, 0.3)]
    for i, rec in enumerate(recs):
        store.update(rec.run_id, metrics={"eval_loss": 2.0 - i})
        store.append_metrics(rec.run_id, [{"step": s, "loss": 3.0 - 0.1 * s * (i + 1)} for s in range(1, 6)])
    out = store.compare(*(r.run_id for r in recs))
    rows = {r["key"]: r for r in out["rows"]}
    assert rows["eval_loss"]["values"] == [2.0, 1.0, 0.0] and "delta" not in rows["eval_loss"]
    assert [d["key"] for d in out["config_diff"]] == ["sft.learning_rate"]
    assert out["config_diff"][0]["values"] == [0.1, 0.1, 0.3]
    curves = store.curves(out["runs"], ["loss", "reward"])
    assert curves["reward"] == {} and curves["loss"][recs[2].run_id][-1] == (5, pytest.approx(1.5))
    with pytest.raises(InputError, match="at least two"):
        store.compare(recs[0].run_id)
    with pytest.raises(InputError, match="named twice"):
        store.compare(recs[0].run_id, recs[0].run_id)


def test_runs_compare_plots_a_png(tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from ragops.commands.runs import runs_app

    home = tmp_path / "home"
    store = RunStore(home / "runs")
    ids = []
    for i in range(2):
        rec = store.create("ppo", config={"ppo": {"kl_coef": 0.1 * (i + 1)}})
        store.append_metrics(rec.run_id, [{"step": s, "reward": 0.1 * s + i, "kl": 0.01 * s} for s in range(1, 9)])
        ids.append(rec.run_id)
    png = tmp_path / "out" / "runs.png"
    r = CliRunner().invoke(runs_app, ["compare", *ids, "--plot", "reward,kl", "--out", str(png), "--data-dir", str(home), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plot"] == str(png)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (1280, 360)  # two panels side by side at 100 dpi
    missing = CliRunner().invoke(runs_app, ["compare", *ids, "--plot", "eval_loss", "--out", str(png), "--data-dir", str(home)])
    assert missing.exit_code == 2 and "per-step values for eval_loss" in missing.output
