"""The CLI through typer's CliRunner: real commands on the shipped sample corpus, tiny models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli(tmp_path: Path, tiny_embedder: Path, tiny_llm_dir: Path):
    """Run ragops commands against a private data dir with tiny models (local runner)."""
    runner = CliRunner()
    base = [
        "--data-dir", str(tmp_path / "data"),
        "--set", f"embedder.model={tiny_embedder}",
        "--set", f"generator.model={tiny_llm_dir}",
        "--set", "generator.max_new_tokens=8",
        "--set", "ingest.runner=local",
        "--set", "ingest.chunker.chunk_tokens=96",
        "--set", "ingest.chunker.overlap_tokens=16",
    ]  # fmt: skip

    def run(*args: str, common: bool = True):
        argv = list(args)
        if common:
            # Options go after the (sub)command words, before positional-free tails.
            words = [a for a in argv if not a.startswith("-")]
            n_cmd = 2 if words and words[0] in {"index", "eval", "config", "models"} else 1
            argv = argv[:n_cmd] + base + argv[n_cmd:]
        return runner.invoke(app, argv, catch_exceptions=False)

    return run


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_help_explains_every_command() -> None:
    runner = CliRunner()
    for argv in (["--help"], ["ingest", "--help"], ["index", "stats", "--help"], ["search", "--help"],
                 ["ask", "--help"], ["eval", "retrieval", "--help"], ["eval", "answers", "--help"]):  # fmt: skip
        res = runner.invoke(app, argv)
        assert res.exit_code == 0 and "Usage" in res.output


def test_ingest_stats_reingest_search_ask_eval(cli, sample_docs: Path) -> None:
    first = _json(cli("ingest", str(sample_docs), "--json"))
    assert first["new"] == 45 and first["failed_count"] == 0 and first["points_written"] > 45
    stats = _json(cli("index", "stats", "--json"))
    assert set(stats) >= {"collection", "documents", "points", "dim", "embedder", "last_ingest"}
    assert stats["documents"] == 45 and stats["points"] == first["points_written"]

    again = _json(cli("ingest", str(sample_docs), "--json"))
    assert again["unchanged"] == 45 and again["points_written"] == 0

    hits = _json(cli("search", "MIG Multi-Instance GPU partitions", "--k", "5", "--mode", "sparse", "--json"))["hits"]
    assert len(hits) == 5 and "gpus/mig.md" in [h["doc_id"] for h in hits[:3]]
    assert set(hits[0]) >= {"rank", "score", "doc_id", "chunk_id", "text", "source", "metadata"}
    filtered = _json(cli("search", "GPU", "--filter", "source=*kubernetes/*", "--json"))["hits"]
    assert filtered and all(h["doc_id"].startswith("kubernetes/") for h in filtered)

    ans = _json(cli("ask", "What is MIG?", "--k", "3", "--json"))
    assert set(ans) >= {"answer", "citations", "timings"} and isinstance(ans["answer"], str)
    for c in ans["citations"]:
        assert set(c) >= {"n", "doc_id", "chunk_id", "source", "score"}

    ev = _json(cli("eval", "retrieval", "--queries", str(REPO / "samples/eval/queries.jsonl"),
                   "--qrels", str(REPO / "samples/eval/qrels.jsonl"), "--mode", "sparse", "--mode", "hybrid", "--json"))  # fmt: skip
    assert set(ev["modes"]) == {"sparse", "hybrid"}
    assert ev["modes"]["sparse"]["recall@10"] > 0.5  # BM25 alone is strong on this corpus


def _tiny_adapter(base_dir: Path, out: Path) -> Path:
    """A LoRA adapter with random B matrices for the tiny model (answers differ from the base's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1.0)
    model.save_pretrained(out)
    return out


def test_ask_readers_streaming_and_answer_eval_with_models(cli, sample_docs: Path, tmp_path: Path, tiny_llm_dir: Path) -> None:
    from ragops.artifacts import Registry
    from ragops.config import load_settings

    cli("ingest", str(sample_docs / "gpus"), "--json")
    streamed = cli("ask", "What is MIG?", "--k", "2", "--stream")
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout.strip()  # the streamed answer (plus its sources) reached stdout
    fid = _json(cli("ask", "What is MIG?", "--k", "2", "--reader", "fid", "--json"))
    assert isinstance(fid["answer"], str) and set(fid) >= {"answer", "citations", "timings"}

    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(line for line in (REPO / "samples/eval/answers.jsonl").read_text().splitlines(True)[:3]))
    plain = _json(cli("eval", "answers", "--data", str(answers), "--k", "2", "--json"))
    assert plain["questions"] == 3 and plain["recorded_on"] is None
    assert all(0.0 <= plain[m] <= 1.0 for m in ("exact_match", "token_f1", "answer_contains"))

    # A trained adapter in the registry: evaluated before (its base) and after, recorded on it.
    registry = Registry.from_settings(load_settings([], [], data_dir=tmp_path / "data", environ={}))
    art = registry.publish(_tiny_adapter(tiny_llm_dir, tmp_path / "adapter"), kind="sft", base_model=str(tiny_llm_dir))
    both = _json(cli("eval", "answers", "--data", str(answers), "--k", "2", "--model", "sft-latest", "--baseline", "base", "--json"))
    assert both["recorded_on"] == art.name and both["baseline"]["model"] == "base"
    assert both["baseline"]["recorded_on"] is None  # a base model has nowhere to record to
    assert both["delta"]["token_f1"] == pytest.approx(both["token_f1"] - both["baseline"]["token_f1"])
    recorded = registry.get(art.name)
    assert recorded.metrics["answer_f1"] == pytest.approx(both["token_f1"])  # the name promotion gates use
    tuned = _json(cli("ask", "What is MIG?", "--k", "2", "--model", "sft-latest", "--reader", "stuff", "--json"))
    assert tuned["engine"] == "transformers"  # no package of this adapter yet
    if importlib.util.find_spec("llama_cpp") is not None:
        # Packaged (adapter merged), the same name answers on llama.cpp; the base stays on transformers.
        assert cli("models", "package", "sft-latest", "--quant", "f16", "--as", "tiny-sft.f16").exit_code == 0
        packaged = _json(cli("ask", "What is MIG?", "--k", "2", "--model", "tiny-sft.f16", "--reader", "stuff", "--json"))
        assert packaged["engine"] == "llamacpp" and isinstance(packaged["answer"], str)
        assert _json(cli("ask", "What is MIG?", "--k", "2", "--model", "sft-latest", "--reader", "stuff", "--json"))["engine"] == "llamacpp"
        assert _json(cli("ask", "What is MIG?", "--k", "2", "--reader", "fid", "--json"))["engine"] == "transformers"
    # A local base model folder is evaluated, not recorded, and does not fail the command.
    local = _json(cli("eval", "answers", "--data", str(answers), "--k", "2", "--model", str(tiny_llm_dir), "--json"))
    assert local["recorded_on"] is None
    bad = cli("eval", "answers", "--data", str(tmp_path / "missing.jsonl"))
    assert bad.exit_code == 2 and "file not found" in " ".join(bad.output.split())  # rich wraps long paths


def test_failed_files_make_ingest_exit_nonzero_and_the_rest_lands(cli, sample_docs: Path) -> None:
    (sample_docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    (sample_docs / "binary.txt").write_bytes(bytes(range(256)) * 4)
    res = cli("ingest", str(sample_docs), "--json")
    assert res.exit_code != 0
    report = json.loads(res.stdout)
    assert report["new"] == 45 and report["failed_count"] == 2
    assert _json(cli("index", "stats", "--json"))["documents"] == 45


def test_ingest_without_paths_reads_ingest_sources(cli, sample_docs: Path) -> None:
    res = cli("ingest")
    assert res.exit_code == 2 and "ingest.sources" in res.output
    report = _json(cli("ingest", "--set", f"ingest.sources=[{json.dumps(str(sample_docs / 'gpus'))}]", "--json"))
    assert report["new"] == 7


def test_bad_input_is_one_message_and_nonzero(cli, sample_docs: Path, tmp_path: Path) -> None:
    res = cli("search", "anything", "--json")
    assert res.exit_code != 0 and "does not exist" in res.output  # missing collection
    cli("ingest", str(sample_docs / "gpus"), "--json")
    for argv, needle in [
        (("search", "   "), "empty query"),
        (("search", "gpu", "--mode", "fancy"), "allowed"),
        (("ask", "gpu", "--reader", "nope"), "allowed: stuff, fid"),
        (("search", "gpu", "--filter", "colour=red"), "allowed"),
        (("search", "gpu", "--set", "retrieval.k=banana"), "retrieval.k"),
        (("ingest", str(tmp_path / "missing")), "not found"),
    ]:
        res = cli(*argv)
        assert res.exit_code != 0, argv
        assert needle in res.output, (argv, res.output)
        assert "Traceback" not in res.output
    assert _json(cli("index", "stats", "--json"))["documents"] == 7  # nothing changed


def test_overlong_query_is_truncated_with_warning(cli, sample_docs: Path) -> None:
    cli("ingest", str(sample_docs / "gpus"), "--json")
    res = cli("search", " ".join(["gpu partition"] * 400), "--json")
    assert res.exit_code == 3
    assert "truncated" in res.stderr
    assert json.loads(res.stdout)["hits"]


def test_unknown_config_key_names_it(cli) -> None:
    res = cli("config", "show", "--set", "embedder.modle=x")
    assert res.exit_code == 2 and "embedder.modle" in res.output and "model" in res.output


def test_models_list_json(tmp_path: Path, tiny_llm_dir: Path) -> None:
    home = ["--data-dir", str(tmp_path)]
    listed = json.loads(CliRunner().invoke(app, ["models", "list", "--json", *home]).stdout)
    assert {"minilm-l6", "smollm2-135m-instruct", "bge-small-en-v1.5"} <= {m["name"] for m in listed["models"]}
    # Which engine would answer, and why (the auto pick on the configured generator).
    gen = listed["generator"]
    assert gen["model"] == "smollm2-135m-instruct" and gen["engine"] in {"llamacpp", "transformers"} and gen["reason"]
    hf = json.loads(CliRunner().invoke(app, ["models", "list", "--json", *home, "--set", f"generator.model={tiny_llm_dir}"]).stdout)
    assert hf["generator"]["engine"] == "transformers" and hf["generator"]["gguf"] is None
    table = CliRunner().invoke(app, ["models", "list", *home])
    assert table.exit_code == 0 and f"runs on {gen['engine']}" in table.stdout
