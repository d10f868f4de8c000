"""Train loops for the retriever's models, run inside Ray Train workers (or in-process).

* :func:`embedder_train_loop`: sentence-transformers' ``SentenceTransformerTrainer`` with
  ``MultipleNegativesRankingLoss`` — every other query's positive in the batch is a negative
  (DPR's in-batch negatives), plus the mined hard negatives as extra columns; batches never
  hold the same text twice (``NO_DUPLICATES``), which would be a false negative.
* :func:`reranker_train_loop`: ``CrossEncoderTrainer`` with binary cross-entropy on
  (query, positive) = 1 and (query, hard negative) = 0.

Both measure the held-out split before the first step and after the last (nDCG/recall/MRR at
``eval_k``) with sentence-transformers' evaluators, and hand the trainer to the shared
:func:`~ragops.finetune.hf.train_and_finish` (resume from the whole transformers checkpoint,
fault drills, final report). The model is fully fine-tuned: a 22M-parameter encoder needs no
adapter, and an adapter would have to be merged before ONNX export and serving anyway.
"""

from __future__ import annotations

import json
from typing import Any

from ragops.finetune.hf import LoopOptions, train_and_finish, training_arguments
from ragops.finetune.session import TrainSession

#: Files written next to the model: the held-out split, evaluable later with `ragops eval retrieval`.
HELDOUT_QUERIES, HELDOUT_QRELS = "heldout_queries.jsonl", "heldout_qrels.jsonl"


def _args(opts: LoopOptions, config: dict[str, Any], session: TrainSession, has_eval: bool) -> dict[str, Any]:
    kw = training_arguments(
        opts, output_dir=str(session.scratch), use_gpu=bool(config.get("use_gpu")), has_eval=has_eval,
        num_to_keep=int(config.get("num_to_keep", 2)), world_size=session.world_size,
    )  # fmt: skip
    kw.pop("max_length")  # a TRL argument; sentence-transformers truncates at the model's max_seq_length
    return kw


def heldout_files(held: list[dict[str, Any]]) -> dict[str, str]:
    """The held-out split as ``ragops eval retrieval`` reads it (document-level qrels)."""
    queries = "".join(json.dumps({"qid": f"q{i}", "query": p["query"]}, ensure_ascii=False) + "\n" for i, p in enumerate(held))
    qrels = "".join(
        json.dumps({"qid": f"q{i}", "doc_id": p["doc_id"]}, ensure_ascii=False) + "\n" for i, p in enumerate(held) if p["doc_id"]
    )
    return {HELDOUT_QUERIES: queries, HELDOUT_QRELS: qrels}


def _prefixed(prefix: str, scores: dict[str, Any], k: int) -> dict[str, float]:
    """sentence-transformers' ``<name>_cosine_ndcg@10`` → ``<prefix>ndcg_at_10`` (gate-friendly names)."""
    out: dict[str, float] = {}
    for key, value in scores.items():
        for metric in ("ndcg", "recall", "mrr", "map"):
            if key.endswith(f"{metric}@{k}"):
                out[f"{prefix}{metric}_at_{k}"] = float(value)
    return out


def _finish(trainer: Any, session: TrainSession, evaluator: Any, k: int, config: dict[str, Any]) -> None:
    """Train with the held-out scores measured before the first step and after the last."""

    def measure(prefix: str) -> Any:
        def run(tr: Any) -> dict[str, Any]:
            if evaluator is None:
                return {}
            scores = _prefixed(prefix, evaluator(tr.model), k)
            if prefix == "initial_eval_":
                # A row of its own: the run shows the starting point at once (and the stall
                # watchdog sees progress while a large held-out corpus is encoded).
                session.log_metrics({"step": 0, **scores})
            return scores

        return run

    train_and_finish(
        trainer, session, has_eval=False, extra_metrics=measure("eval_"), before_train=measure("initial_eval_"),
        extra_files=heldout_files(config.get("heldout") or []),
    )  # fmt: skip


def embedder_train_loop(config: dict[str, Any], session: TrainSession) -> None:
    """Fine-tune a sentence-transformers bi-encoder and report it as the final checkpoint.

    Args:
        config: ``{"base": {"path", "name"}, "train": [{"anchor", "positive", "negative_1", ...}],
            "eval": {"queries", "corpus", "relevant"} | None, "heldout": [pairs], "embedder":
            EmbedderTrainSettings dict, "use_gpu", "num_to_keep", "fault"?}``.
        session: Where metrics and checkpoints go.
    """
    from datasets import Dataset
    from ragops.finetune.config import EmbedderTrainSettings
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    st = EmbedderTrainSettings.model_validate(config["embedder"])
    opts = LoopOptions.from_settings(st.model_dump())
    model = SentenceTransformer(config["base"]["path"], device="cuda" if config.get("use_gpu") else "cpu", local_files_only=True)
    model.max_seq_length = min(int(model.max_seq_length or st.max_length), st.max_length)
    # BERT's pooler head is unused by sentence pooling; DDP (Ray Train's workers) refuses
    # parameters that get no gradient, and searching for them each step costs time.
    for module in model.modules():
        if (pooler := getattr(module, "pooler", None)) is not None and hasattr(pooler, "parameters"):
            pooler.requires_grad_(False)
    held = config.get("eval")
    evaluator = None
    if held:
        evaluator = InformationRetrievalEvaluator(
            queries=held["queries"], corpus=held["corpus"], relevant_docs={q: set(v) for q, v in held["relevant"].items()},
            ndcg_at_k=[st.eval_k], mrr_at_k=[st.eval_k], accuracy_at_k=[1, st.eval_k], precision_recall_at_k=[st.eval_k],
            map_at_k=[st.eval_k], name="heldout", write_csv=False, query_prompt=config.get("query_prompt") or None,
        )  # fmt: skip
    args = SentenceTransformerTrainingArguments(
        **_args(opts, config, session, has_eval=False), batch_sampler=BatchSamplers.NO_DUPLICATES
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(config["train"]),
        loss=MultipleNegativesRankingLoss(model, scale=st.scale),
        callbacks=session.hf_callbacks(config.get("fault")),
    )
    trainer = session.prepare(trainer)

    _finish(trainer, session, evaluator, st.eval_k, config)


def reranker_train_loop(config: dict[str, Any], session: TrainSession) -> None:
    """Fine-tune a cross-encoder (a new score head on a plain encoder) and report it.

    Args:
        config: ``{"base": {"path", "name"}, "train": [{"query", "passage", "label"}], "eval":
            [{"query", "positive": [..], "negative": [..]}] | None, "heldout": [pairs],
            "reranker": RerankerTrainSettings dict, "use_gpu", "num_to_keep", "fault"?}``.
        session: Where metrics and checkpoints go.
    """
    from datasets import Dataset
    from ragops.finetune.config import RerankerTrainSettings
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    rs = RerankerTrainSettings.model_validate(config["reranker"])
    opts = LoopOptions.from_settings(rs.model_dump())
    model = CrossEncoder(config["base"]["path"], num_labels=1, max_length=rs.max_length,
                         device="cuda" if config.get("use_gpu") else "cpu", local_files_only=True)  # fmt: skip
    held = config.get("eval")
    evaluator = (
        CrossEncoderRerankingEvaluator(samples=held, at_k=rs.eval_k, name="heldout", write_csv=False, mrr_at_k=rs.eval_k)
        if held
        else None
    )
    args = CrossEncoderTrainingArguments(**_args(opts, config, session, has_eval=False))
    trainer = CrossEncoderTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(config["train"]),
        loss=BinaryCrossEntropyLoss(model),
        callbacks=session.hf_callbacks(config.get("fault")),
    )
    trainer = session.prepare(trainer)

    _finish(trainer, session, evaluator, rs.eval_k, config)
