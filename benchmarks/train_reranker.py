"""Fine-tune a small cross-encoder reranker for the Python-docs benchmark, on CPU.

No pretrained cross-encoder is available offline here, so this trains one from the packaged
all-MiniLM-L6-v2 weights (``ragops.model_registry.resolve_model('minilm-l6')``): the BERT
encoder is loaded as ``BertForSequenceClassification`` with ``num_labels=1`` (a new, random
scoring head) and trained with binary cross-entropy on (query, chunk) pairs.

Training data is the benchmark's ``train`` split only (``train_queries.jsonl`` /
``train_qrels.jsonl`` from ``build_pydocs_benchmark.py``), whose pages are disjoint from the
``test`` and ``dev`` splits'. For each training query the script searches the ingested index
the way the reranker will be used (hybrid, top ``--candidates`` chunks) and takes:

* one positive: a chunk of the relevant section, preferably one that shows the documented
  entry's signature (``name(``), else the section's best-ranked (or first) chunk;
* ``--negatives`` hard negatives: best chunks of other documents among the candidates, half
  from the top of the ranking and half at random from the rest. Chunks of pages that hold
  test or dev queries are never used, so no evaluated section is seen in training at all.

The passage side is built by :func:`ragops.retrieval.rerank.pair_text`, exactly what
:class:`ragops.retrieval.rerank.Reranker` scores at query time. Training stops after one
epoch or ``--max-minutes``, whichever is first; the model is saved as a sentence-transformers
CrossEncoder folder that ``retrieval.rerank.model=<folder>`` loads.

Usage::

    python benchmarks/train_reranker.py                      # after retrieval_quality.py ingested
    python benchmarks/train_reranker.py --max-minutes 20 --negatives 7
    python benchmarks/train_reranker.py --resume --max-minutes 20   # go on where it stopped
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_BENCH = HERE / "out" / "pydocs"
DEFAULT_DATA = HERE / "out" / "pydocs-index"
DEFAULT_OUT = HERE / "out" / "reranker-minilm"
HF_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def mine_pairs(args: argparse.Namespace) -> tuple[list[tuple[str, str, float]], dict]:
    """(query, passage, label) pairs from the train split, with hard negatives from hybrid search."""
    from ragops.retrieval.evaluate import read_jsonl
    from ragops.retrieval.rerank import pair_text
    from ragops.retrieval.search import Retriever, SearchHit

    from ragops.config import load_settings
    from ragops.vectorstore.base import Filter, Hit, Match

    bench: Path = args.bench
    queries = {
        q["qid"]: q["query"]
        for q in read_jsonl(bench / "train_queries.jsonl", ["qid", "query"])
    }
    qrels = {
        r["qid"]: r for r in read_jsonl(bench / "train_qrels.jsonl", ["qid", "doc_id"])
    }
    held_out_pages = {
        r["doc_id"].split("#", 1)[0]
        for name in ("qrels.jsonl", "dev_qrels.jsonl")
        for r in read_jsonl(bench / name, ["qid", "doc_id"])
    }
    settings = load_settings(
        overrides=[
            f"data_dir={args.data_dir}",
            f"vectorstore.collection={args.collection}",
        ]
    )
    rng = random.Random(args.seed)
    qids = sorted(q for q in queries if q in qrels)
    rng.shuffle(qids)
    if args.max_queries:
        qids = qids[: args.max_queries]
    pairs: list[tuple[str, str, float]] = []
    stats = {
        "queries": 0,
        "positive_in_candidates": 0,
        "positive_by_name": 0,
        "negatives": 0,
    }
    with Retriever(settings) as retriever:
        store = retriever.store
        for start in range(0, len(qids), 64):
            batch = qids[start : start + 64]
            found = retriever.search_batch(
                [queries[q] for q in batch], k=args.candidates, mode="hybrid"
            )
            for qid, res in zip(batch, found):
                rel = qrels[qid]["doc_id"]
                short = str(qrels[qid].get("entry", "")).rsplit(".", 1)[-1]
                # The relevant section's chunks: retrieved ones first (best first), then the
                # rest in document order (read from the store, no search needed).
                retrieved = [h for h in res.hits if h.doc_id == rel]
                seen = {h.chunk_id for h in retrieved}
                stored = sorted(
                    (
                        SearchHit.from_store_hit(Hit(r.id, 0.0, r.payload), 0)
                        for r in store.scroll(Filter(must=[Match("doc_id", [rel])]))
                    ),
                    key=lambda h: h.chunk_index,
                )
                own = retrieved + [h for h in stored if h.chunk_id not in seen]
                if not own:
                    continue
                named = [
                    h
                    for h in own
                    if short and re.search(rf"(?<![\w.]){re.escape(short)}\(", h.text)
                ]
                positive = named[0] if named else own[0]
                stats["positive_by_name"] += bool(named)
                stats["positive_in_candidates"] += bool(retrieved)
                best_other: dict[str, object] = {}
                for h in res.hits:
                    if (
                        h.doc_id != rel
                        and h.doc_id.split("#", 1)[0] not in held_out_pages
                    ):
                        best_other.setdefault(h.doc_id, h)
                others = list(best_other.values())
                top = others[: (args.negatives + 1) // 2]
                rest = others[len(top) :]
                negs = top + rng.sample(rest, min(len(rest), args.negatives - len(top)))
                pairs.append((queries[qid], pair_text(positive), 1.0))
                pairs.extend((queries[qid], pair_text(n), 0.0) for n in negs)  # type: ignore[arg-type]
                stats["queries"] += 1
                stats["negatives"] += len(negs)
            print(
                f"  mined {start + len(batch)}/{len(qids)} queries, {len(pairs)} pairs",
                flush=True,
            )
    rng.shuffle(pairs)
    return pairs, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--bench", type=Path, default=DEFAULT_BENCH)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--collection", default="pydocs")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--base",
        default="minilm-l6",
        help="registry name or folder of the BERT encoder to start from",
    )
    ap.add_argument(
        "--candidates",
        type=int,
        default=30,
        help="hybrid hits negatives are drawn from",
    )
    ap.add_argument("--negatives", type=int, default=3, help="hard negatives per query")
    ap.add_argument(
        "--max-queries",
        type=int,
        default=0,
        help="use at most this many train queries (0: all)",
    )
    ap.add_argument(
        "--max-minutes", type=float, default=15.0, help="stop training after this long"
    )
    ap.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="tokens of query + passage, in training and at query time (saved with the model)",
    )
    ap.add_argument(
        "--freeze-layers",
        type=int,
        default=0,
        help="keep the embeddings and the first N layers fixed",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue training the model in --out on the pairs it has not seen yet",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from datasets import Dataset
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder import (
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import TrainerCallback

    from ragops.model_registry import resolve_model

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    print("mining training pairs from the train split ...", flush=True)
    pairs, stats = mine_pairs(args)
    mine_s = time.perf_counter() - t0
    print(
        f"  {len(pairs)} pairs from {stats['queries']} queries in {mine_s:.0f}s: {stats}",
        flush=True,
    )

    previous: dict = {}
    if args.resume:
        # Go on from a saved run: same pairs (same seed), starting after those it trained on.
        previous = json.loads(
            (args.out / "ragops_training.json").read_text(encoding="utf-8")
        )
        done = int(previous["pairs_seen_total"])
        print(
            f"resuming {args.out}: skipping the {done} pairs it was trained on",
            flush=True,
        )
        pairs = pairs[done:]
        model = CrossEncoder(str(args.out), device="cpu", local_files_only=True)
    else:
        base = resolve_model(args.base, kind="embedder").locate()
        with tempfile.TemporaryDirectory() as tmp:
            # Only the Hugging Face files: the folder's modules.json describes a bi-encoder.
            for name in HF_FILES:
                if (base / name).exists():
                    shutil.copy(base / name, Path(tmp) / name)
            model = CrossEncoder(
                tmp,
                num_labels=1,
                max_length=args.max_length,
                device="cpu",
                local_files_only=True,
            )
    if args.freeze_layers:
        bert = model[0].model.base_model
        for p in bert.embeddings.parameters():
            p.requires_grad = False
        for layer in bert.encoder.layer[: args.freeze_layers]:
            for p in layer.parameters():
                p.requires_grad = False

    data = Dataset.from_dict({
        "query": [p[0] for p in pairs], "passage": [p[1] for p in pairs], "label": [p[2] for p in pairs],
    })  # fmt: skip
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(float(args.negatives)))
    budget_s = args.max_minutes * 60

    class Budget(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            if time.perf_counter() - self.start > budget_s:
                control.should_training_stop = True
            if state.global_step % 20 == 0:
                print(
                    f"  step {state.global_step}/{state.max_steps}, {time.perf_counter() - self.start:.0f}s",
                    flush=True,
                )
            return control

    with tempfile.TemporaryDirectory() as work:
        targs = CrossEncoderTrainingArguments(
            output_dir=work,
            num_train_epochs=1,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            warmup_steps=max(1, int(0.1 * len(pairs) / args.batch_size)),
            weight_decay=0.01,
            logging_steps=20,
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = CrossEncoderTrainer(
            model=model, args=targs, train_dataset=data, loss=loss, callbacks=[Budget()]
        )
        t1 = time.perf_counter()
        out = trainer.train()
        train_s = time.perf_counter() - t1
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(str(args.out))
    steps = out.global_step
    seen = min(len(pairs), steps * args.batch_size)
    meta = {
        "base": str(args.base),
        "train_queries": stats["queries"],
        "pairs": len(pairs) + int(previous.get("pairs_seen_total", 0)),
        "pairs_seen_total": seen + int(previous.get("pairs_seen_total", 0)),
        "steps_total": steps + int(previous.get("steps_total", 0)),
        "train_s_total": round(train_s + float(previous.get("train_s_total", 0.0)), 1),
        "this_run": {"pairs_seen": seen, "steps": steps, "train_loss": round(float(out.training_loss), 4),
                     "train_s": round(train_s, 1)},
        "previous_runs": [*previous.get("previous_runs", []), previous["this_run"]] if previous else [],
        "mining": stats,
        "mine_s": round(mine_s, 1),
        "args": {k: str(v) for k, v in vars(args).items()},
    }  # fmt: skip
    (args.out / "ragops_training.json").write_text(
        json.dumps(meta, indent=2) + "\n", encoding="utf-8"
    )
    print(json.dumps(meta, indent=2))
    print(
        f"saved the cross-encoder to {args.out}; use --set retrieval.rerank.model={args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
